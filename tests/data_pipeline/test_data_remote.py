"""Streaming from URLs: an HTTP server on 127.0.0.1 (started here) and webdataset `pipe:` URLs.

A dropped connection must be resumed (HTTP Range, or re-reading from the start when the server
has no Range support) or end in a clear error: never a silently shorter epoch.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import ShardFetchError
from data_pipeline.inspection import verify
from data_pipeline.stream import build_stream
from data_pipeline.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

B, MB = 16, 2


class _Server:
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

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _batches(path: str, D: int, n: int, **kw) -> list[np.ndarray]:
    """First n global batches, rows in global sample order, rebuilt from D ranks."""
    per_rank = []
    for r in range(D):
        cfg = DataConfig(paths=[path], shuffle_window=16, **kw)
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
    from data_pipeline.remote import open_url

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


def test_webdataset_pipe_urls(small_corpus, tmp_path):
    import shutil

    folder, _ = small_corpus
    local = _batches(str(folder), 1, 12)
    assert _same(_batches(f"pipe:cat {folder}", 2, 12), local)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "train-000002.tar").unlink()
    with pytest.raises(ShardFetchError, match="train-000002.tar"):  # `cat` fails: an error, not a skip
        _batches(f"pipe:cat {copy}", 1, 200)
