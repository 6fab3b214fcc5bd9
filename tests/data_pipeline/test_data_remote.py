"""Reading from URLs: an HTTP server on 127.0.0.1 (started here) and webdataset `pipe:` URLs.

Training reads one HTTP Range request per sample. A dropped connection must be resumed (HTTP
Range, or re-reading from the start when the server has no Range support) or end in a clear
error: never a silently shorter epoch. `pipe:` folders can be inspected and verified, not trained on.
"""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from hippo.data_pipeline.config import DataConfig
from hippo.data_pipeline.errors import ShardFetchError
from hippo.data_pipeline.inspection import verify
from hippo.data_pipeline.stream import build_stream
from hippo.data_pipeline.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

B, MB = 16, 2


class _Backlogged(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops connections beyond it: 1 s SYN retries for concurrent readers


class _LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 for the life of a `with` block."""

    def _serve(self, handler: type[BaseHTTPRequestHandler], path: str) -> None:
        handler.disable_nagle_algorithm = True  # else each small response waits ~40 ms for a delayed ACK
        self.httpd = _Backlogged(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Server(_LoopbackServer):
    """Serves a folder under /data; can drop connections in .tar files.

    drop="first": each shard's first response stops halfway; "always": no response gets past byte 4096;
    "then-503": the first response stops halfway and every later request gets HTTP 503.
    """

    def __init__(self, folder, *, ranges=True, drop="never"):
        self.folder, self.ranges, self.drop = folder, ranges, drop
        self.requests: Counter = Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.removeprefix("/data/")
                path = outer.folder / name
                if not self.path.startswith("/data/") or not path.is_file():
                    self.send_error(404)
                    return
                outer.requests[name] += 1
                if name.endswith(".tar") and outer.drop == "then-503" and outer.requests[name] > 1:
                    self.send_error(503)  # the retries reach a server that is going down
                    return
                data = path.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng and outer.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name.endswith(".tar") and outer.drop == "first" and outer.requests[name] == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True  # the client sees the body end early
                    return
                if name.endswith(".tar") and outer.drop == "then-503":
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                if name.endswith(".tar") and outer.drop == "always":
                    self.wfile.write(body[: max(0, 4096 - start)])  # never gets past byte 4096
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self._serve(Handler, "data")


def _batches(path: str, D: int, n: int, **kw) -> list[np.ndarray]:
    """First n global batches, rows in global sample order, rebuilt from D ranks."""
    per_rank = []
    for r in range(D):
        cfg = DataConfig(paths=[path], **kw)
        it = iter(build_stream(cfg, dp_rank=r, dp_size=D, micro_batch_size=MB, global_batch_size=B))
        per_rank.append([row for _ in range(n * B // D // MB) for row in next(it).numpy()])
    return [np.stack([per_rank[g % D][k * (B // D) + g // D] for g in range(B)]) for k in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_http_streams_the_same_batches_as_local_disk(small_corpus):
    folder, _ = small_corpus
    local = _batches(str(folder), 1, 40)
    with _Server(folder) as srv:
        assert _same(_batches(srv.url, 2, 40), local)
        assert _same(_batches(srv.url, 2, 10, num_workers=2), local[:10])
        assert load_tokenizer(srv.url).name == "byte"
        report = verify(srv.url)
        assert report.ok and report.shards == len([p for p in folder.iterdir() if p.suffix == ".tar"])


@pytest.mark.parametrize("ranges", [True, False])
def test_dropped_connections_are_resumed_without_losing_samples(small_corpus, ranges):
    folder, _ = small_corpus
    local = _batches(str(folder), 1, 40)
    with _Server(folder, ranges=ranges, drop="first") as srv:
        assert _same(_batches(srv.url, 1, 40), local)
        assert max(srv.requests[n] for n in srv.requests if n.endswith(".tar")) >= 2  # it did reconnect


def test_a_server_that_keeps_dropping_gives_a_clear_error(small_corpus):
    folder, _ = small_corpus
    with _Server(folder, drop="always") as srv:
        with pytest.raises(ShardFetchError, match=r"127\.0\.0\.1.*train-\d+\.tar: connection lost at byte"):
            _batches(srv.url, 1, 40, retries=1)


def test_failed_reconnects_raise_instead_of_ending_the_shard_early(small_corpus):
    from hippo.data_pipeline.remote import open_url

    folder, _ = small_corpus
    name = "train-000001.tar"
    size = (folder / name).stat().st_size
    with _Server(folder, drop="then-503") as srv:
        with open_url(f"{srv.url}/{name}", expected_size=size, retries=2) as f:
            with pytest.raises(ShardFetchError, match=f"{name}: connection lost at byte {size // 2}"):
                f.read()
        assert srv.requests[name] == 3  # the first request and two retries


def test_missing_remote_shard_is_an_error_not_a_skip(small_corpus, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_corpus[0], copy)
    (copy / "train-000002.tar").unlink()
    with _Server(copy) as srv:
        with pytest.raises(ShardFetchError, match="HTTP 404"):
            _batches(srv.url, 1, 200)


def test_pipe_urls_are_verified_but_refused_for_training(small_corpus):
    folder, _ = small_corpus
    assert verify(f"pipe:cat {folder}").ok  # index included
    with pytest.raises(ValueError, match=r"pipe:cat .* is a `pipe:` command.*copy the folder to local disk or "
                                         "serve it over HTTP"):
        _batches(f"pipe:cat {folder}", 1, 1)


class _BlobServer(_LoopbackServer):
    """Serves one object at /blob (HTTP Range `bytes=a-` and `bytes=a-b` when `ranges`); the next
    `drops` responses stop at absolute byte `cut`. Logs every request's Range header."""

    def __init__(self, blob: bytes, *, ranges: bool):
        self.blob, self.ranges, self.cut, self.drops = blob, ranges, 0, 0
        self.range_headers: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = outer.blob
                rng = self.headers.get("Range")
                outer.range_headers.append(rng)
                start, end = 0, len(data) - 1
                if rng and outer.ranges:
                    a, _, b = rng.removeprefix("bytes=").partition("-")
                    start, end = int(a), int(b) if b else len(data) - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start : end + 1]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.drops:
                    outer.drops -= 1
                    self.wfile.write(body[: max(0, outer.cut - start)])
                    self.close_connection = True  # the client sees the body end before Content-Length
                    return
                self.wfile.write(body)

        self._serve(Handler, "blob")


def _urllib_read(url: str, start: int = 0, length: int | None = None) -> bytes:
    """The library reference: one plain urllib request, with a Range header unless reading it all."""
    headers = {}
    if start or length is not None:
        headers["Range"] = f"bytes={start}-" + ("" if length is None else str(start + length - 1))
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
        return resp.read()


def test_http_reader_reads_the_same_bytes_as_urllib(tmp_path):
    """Hippo's own HTTP reader (remote.ResumableHTTPReader) against urllib and the stdlib http.server.

    A stdlib `SimpleHTTPRequestHandler` serves the file whole; then a server that drops the body at
    several offsets: Hippo's reader must resume there (a `Range: bytes=<offset>-` request, or with
    no Range support by re-reading and skipping) and give back, byte for byte, what urllib reads
    at those offsets and lengths, for any read sizes.
    """
    import functools
    from http.server import SimpleHTTPRequestHandler

    from hippo.data_pipeline.remote import ResumableHTTPReader, open_url

    blob = np.random.default_rng(0).integers(0, 256, (1 << 20) + 300_001, dtype=np.uint8).tobytes()
    (tmp_path / "blob.bin").write_bytes(blob)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin"
        with open_url(url) as f:
            assert f.read() == _urllib_read(url) == blob
    finally:
        httpd.shutdown()
        httpd.server_close()

    cuts = [1, 511, 4096, 65_537, (1 << 20) + 3, len(blob) - 1]
    sizes = [1, 7, 512, 4095, 65_536, 1 << 20]
    for ranges in (True, False):
        with _BlobServer(blob, ranges=ranges) as srv:
            if ranges:
                for start in cuts:  # the server's ranges are what urllib (and the file) say they are
                    assert _urllib_read(srv.url, start) == blob[start:]
                    for n in (1, 1000, 70_000):
                        assert _urllib_read(srv.url, start, n) == blob[start : start + n]
            assert _urllib_read(srv.url) == blob
            for i, cut in enumerate(cuts):
                srv.cut, srv.drops, srv.range_headers = cut, 1, []
                r = ResumableHTTPReader(srv.url, expected_size=len(blob), retries=2)
                got, k = bytearray(), i
                while chunk := r.read(sizes[k % len(sizes)]):  # raw reads of varying lengths
                    got += chunk
                    k += 1
                r.close()
                assert r.reconnects == 1
                assert srv.range_headers == [None, f"bytes={cut}-"]  # resumed exactly at the drop
                assert bytes(got) == _urllib_read(srv.url) == blob
                if ranges:
                    assert bytes(got[cut:]) == _urllib_read(srv.url, cut)
                    for n in (1, 4096):
                        assert bytes(got[cut : cut + n]) == _urllib_read(srv.url, cut, n)
                srv.drops = 1
                with open_url(srv.url, expected_size=len(blob), retries=2) as f:  # buffered, as shards are read
                    assert f.read() == blob


def test_range_reads_resume_after_drops_and_work_without_range_support():
    """`read_range` (one sample's bytes) against urllib's view of the object: any range, a body
    dropped mid-way (resumed from the byte it stopped at), a range past the end, no Range support."""
    from hippo.data_pipeline.remote import read_range

    blob = np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    for ranges in (True, False):
        with _BlobServer(blob, ranges=ranges) as srv:
            for start, stop in [(0, 1), (511, 5000), (100_000, 200_000), (199_999, 200_000)]:
                assert read_range(srv.url, start, stop) == blob[start:stop] == _urllib_read(srv.url)[start:stop]
            srv.cut, srv.drops = 150_000, 1
            assert read_range(srv.url, 100_000, 200_000, retries=1) == blob[100_000:]
            assert srv.drops == 0
            assert read_range(srv.url, 150_000, 250_000) == blob[150_000:]  # the object ends first
