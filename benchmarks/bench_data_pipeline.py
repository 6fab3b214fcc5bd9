"""Data pipeline throughput: prepare (tokens/s per worker) and streaming (tokens/s for one reader).

Uses the embedded default corpus (Python stdlib sources), so it runs anywhere with nothing to
download. Prepare is timed end to end (read, tokenize, pack, compress, write, manifest) with
the byte tokenizer and a byte-level BPE trained here; streaming reads the byte-tokenized
shards with `build_stream` in the calling process (num_workers=0, one torch thread), micro
batch 8, and counts seq_len tokens per sample (what the trainer consumes per sample).

The data-order tables (issue 24): one DP-1 rank's reading speed with the 3072-virtual-stream reader
of `--baseline` (extracted from git into a temporary package) and with today's global index, side
by side in one run; today's reader over loopback HTTP (a server process, one Range request per
sample); and start-up, in a fresh process, for a synthetic manifest of 6,000 shards x 5,000 samples.

    python benchmarks/bench_data_pipeline.py [--corpus-mb 8] [--seconds 5] [--output results.md]
    python benchmarks/bench_data_pipeline.py --only-data-order [--seconds 4]
"""

from __future__ import annotations

import os

# One worker = one core, also for the in-process (workers=1) BPE run; must precede tokenizers' first use.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

# torch (and the stream, which imports it) are imported where used: the start-up child measures
# its memory without them.
from hippo.data_pipeline.config import DataConfig

TINY_CONFIG_TOKENS_PER_S = 20_000  # the tiny CPU training config (to be confirmed by the trainer benchmark)
REQUIRED_FACTOR = 50


def bench_prepare(corpus: Path, work: Path, tokenizer: str, label: str, workers: int, seq_len: int) -> dict:
    from hippo.data_pipeline.prepare import prepare

    out = work / f"prep-{label}-w{workers}-{seq_len}"
    t0 = time.perf_counter()
    m = prepare([corpus], out, tokenizer=tokenizer, seq_len=seq_len, workers=workers, shard_bytes=4 << 20,
                progress=False, overwrite=True)
    dt = time.perf_counter() - t0
    tokens = m.splits["train"].tokens
    return {"tokenizer": label, "workers": workers, "seq_len": seq_len, "tokens": tokens, "seconds": dt,
            "tok_s": tokens / dt, "tok_s_worker": tokens / dt / workers, "folder": out}


def bench_stream(folder: Path, seq_len: int, seconds: float, micro_batch: int = 8, num_workers: int = 0,
                 dp_size: int = 1, impl=None) -> dict:
    """One rank's reading speed; `impl`: (build_stream, DataConfig) of another reader (the baseline)."""
    from hippo.data_pipeline.stream import build_stream

    build, config = impl or (build_stream, DataConfig)
    cfg = config(paths=[str(folder)], num_workers=num_workers)
    stream = build(cfg, dp_rank=0, dp_size=dp_size, micro_batch_size=micro_batch,
                   global_batch_size=micro_batch * dp_size)
    it = iter(stream)
    for _ in range(10):  # warm-up: first reads, worker start-up
        next(it)
    t0 = time.perf_counter()
    samples = 0
    while time.perf_counter() - t0 < seconds:
        samples += next(it).shape[0]
    dt = time.perf_counter() - t0
    return {"seq_len": seq_len, "micro_batch": micro_batch, "num_workers": num_workers, "samples": samples,
            "seconds": dt, "tok_s": samples * seq_len / dt, "epoch_samples": stream.samples_per_epoch}


# ---------------------------------------------------------------- before / after issue 24

BASELINE_COMMIT = "9307dce"
"""The last commit with the 3072-virtual-stream reader (issue 24 replaced it)."""
H100_RANK_TOKENS_PER_S = 51_000
"""What an H100 rank of hybrid_1.3b trains at: 989 TFLOP/s x 40% MFU / (6 x 1.3e9 FLOP per token)."""


def baseline_reader(commit: str, work: Path):
    """(build_stream, DataConfig) of `data_pipeline` at `commit`, extracted by `git archive` into
    `work` as its own package; None where git or the commit is not there."""
    import importlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    dest = work / "baseline"
    dest.mkdir()
    try:
        tar = subprocess.run(["git", "-C", str(root), "archive", commit, "data_pipeline"], check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"no baseline ({commit}): {e}", file=sys.stderr)
        return None
    (dest / "data_pipeline").rename(dest / "hippo_dp_baseline")
    sys.path.insert(0, str(dest))
    stream, config = (importlib.import_module(f"hippo_dp_baseline.{m}") for m in ("stream", "config"))
    return stream.build_stream, config.DataConfig


def baseline_view(folder: Path, work: Path) -> Path:
    """The same shards under a manifest without the sample index entry (the old reader's schema)."""
    import json

    view = work / f"baseline-{folder.name}"
    view.mkdir()
    m = json.loads((folder / "manifest.json").read_text())
    for split in m["splits"].values():
        split.pop("index", None)
    (view / "manifest.json").write_text(json.dumps(m))
    for p in folder.glob("*.tar"):
        (view / p.name).symlink_to(p)
    return view


def bench_before_after(folders: dict[int, Path], seconds: float, work: Path, commit: str,
                       rounds: int = 2) -> list[dict]:
    """One DP-1 rank's reading speed, the baseline's 3072-stream reader and this one, rounds
    interleaved, best of `rounds` each."""
    old = baseline_reader(commit, work)
    rows = []
    for seq_len, folder in folders.items():
        view = baseline_view(folder, work) if old else None
        best = {"old": 0.0, "new": 0.0}
        for _ in range(rounds):
            if old:
                best["old"] = max(best["old"], bench_stream(view, seq_len, seconds, impl=old)["tok_s"])
            best["new"] = max(best["new"], bench_stream(folder, seq_len, seconds)["tok_s"])
        rows.append({"seq_len": seq_len, **best})
    return rows


def _serve_folder(folder: str, port) -> None:
    """A threaded HTTP server with Range support for `folder` (run in its own process)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # kept-alive connections, as object stores and nginx serve them
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def do_GET(self):
            path = Path(folder) / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            if rng := self.headers.get("Range"):
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start, end = int(a), min(int(b) if b else size - 1, size - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end + 1 - start))
            self.end_headers()
            with open(path, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end + 1 - start))

    class Server(ThreadingHTTPServer):
        request_queue_size = 128
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # a reader stopped at the end of a measurement closes its connections mid-response

    httpd = Server(("127.0.0.1", 0), Handler)
    port.value = httpd.server_address[1]
    httpd.serve_forever()


def bench_http(folders: dict[int, Path], seconds: float) -> list[dict]:
    """One rank reading over loopback HTTP (a server process per folder, one Range request per sample)."""
    import multiprocessing

    rows = []
    ctx = multiprocessing.get_context("spawn")
    for seq_len, folder in folders.items():
        port = ctx.Value("i", 0)
        proc = ctx.Process(target=_serve_folder, args=(str(folder), port), daemon=True)
        proc.start()
        while not port.value:
            time.sleep(0.05)
        try:
            r = bench_stream(f"http://127.0.0.1:{port.value}", seq_len, seconds)
        finally:
            proc.terminate()
            proc.join()
        rows.append(r)
    return rows


def _synthetic_split(shards: int, per_shard: int, index: dict | None):
    from hippo.data_pipeline.manifest import SplitInfo
    from hippo.data_pipeline.shard_io import ShardInfo

    return SplitInfo(shards=[ShardInfo(f"train-{k:06d}.tar", per_shard, 5120 * per_shard, "") for k in range(shards)],
                     samples=shards * per_shard, index=index)


def startup_child(folder: str, shards: int, per_shard: int, sha256: str) -> dict:
    """In a fresh process: build the order (epoch 0, first global batch located) and load the
    split index of a synthetic `shards` x `per_shard` manifest; seconds and peak RSS."""
    import numpy as np

    from hippo.data_pipeline.sample_index import load_index
    from hippo.data_pipeline.sample_order import SampleOrder

    size = shards * (per_shard + 1) * 8
    split = _synthetic_split(shards, per_shard, {"name": "train.index", "bytes": size, "sha256": sha256})
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    order = SampleOrder([[sh.samples for sh in split.shards]], weights=[1.0], seed=1234, global_batch_size=1024)
    order.epoch(0).locate(np.arange(1024))
    t_order = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_index(folder, "train", split)
    t_index = time.perf_counter() - t0
    return {"samples": shards * per_shard, "shards": shards, "order_s": t_order, "index_s": t_index,
            "peak_rss_mb": _peak_rss_mb(), "before_mb": base}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_startup(shards: int, per_shard: int) -> dict:
    """`startup_child` in a fresh process, after writing the synthetic index file here."""
    import hashlib
    import json
    import subprocess

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="hippo-startup-") as tmp:
        data = np.tile(np.arange(per_shard + 1, dtype="<u8") * 5120, shards).tobytes()
        (Path(tmp) / "train.index").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        del data
        out = subprocess.run([sys.executable, __file__, "--startup-child", f"{tmp}:{shards}x{per_shard}:{sha}"],
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def data_order_tables(before_after: list[dict], http: list[dict], startup: dict) -> str:
    lines = [f"| seq_len | 3072 virtual streams ({BASELINE_COMMIT}), DP 1: tokens/s | global index (now), DP 1: "
             "tokens/s | now / before |", "|---:|---:|---:|---:|"]
    for r in before_after:
        ratio = f"{r['new'] / r['old']:.2f}" if r["old"] else "-"
        lines.append(f"| {r['seq_len']} | {r['old']:,.0f} | {r['new']:,.0f} | {ratio} |")
    lines += ["", f"| over loopback HTTP | seq_len | tokens/s | x an H100 rank of hybrid_1.3b "
                  f"({H100_RANK_TOKENS_PER_S:,} tok/s) |", "|---|---:|---:|---:|"]
    for r in http:
        lines.append(f"| one rank, no workers | {r['seq_len']} | {r['tok_s']:,.0f} | "
                     f"{r['tok_s'] / H100_RANK_TOKENS_PER_S:,.0f}x |")
    s = startup
    lines += ["", "| start-up | samples | shards | order (epoch 0 + first batch located) | index loaded and checked "
                  "| peak RSS (before) |", "|---|---:|---:|---:|---:|---:|",
              f"| one rank | {s['samples']:,} | {s['shards']:,} | {s['order_s']:.2f} s | {s['index_s']:.2f} s | "
              f"{s['peak_rss_mb']:,.0f} MB ({s['before_mb']:,.0f} MB) |"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-mb", type=float, default=8.0, help="default-corpus text to prepare (MB)")
    ap.add_argument("--bpe-vocab", type=int, default=8192, help="vocabulary of the BPE trained for the benchmark")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each streaming measurement")
    ap.add_argument("--workers", default="1,2", help="prepare worker counts to measure")
    ap.add_argument("--output", help="also write the Markdown table here")
    ap.add_argument("--only-data-order", action="store_true",
                    help="only the issue-24 tables: reading before/after, loopback HTTP, start-up")
    ap.add_argument("--baseline", default=BASELINE_COMMIT, help="commit of the reader to compare with")
    ap.add_argument("--startup-shards", default="6000x5000", help="synthetic manifest for start-up: SHARDSxSAMPLES")
    ap.add_argument("--startup-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.startup_child:
        import json

        folder, size, sha = args.startup_child.split(":")
        print(json.dumps(startup_child(folder, *map(int, size.split("x")), sha)))
        return 0
    import torch

    from hippo.data_pipeline.default_corpus import write_default_corpus
    from hippo.data_pipeline.sources import iter_texts
    from hippo.data_pipeline.tokenizer import train_bpe_tokenizer

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="hippo-bench-") as tmp:
        work = Path(tmp)
        corpus = write_default_corpus(work / "corpus.jsonl", int(args.corpus_mb * 1e6))
        corpus_bytes = corpus.stat().st_size
        t0 = time.perf_counter()
        train_bpe_tokenizer(iter_texts([corpus], 400), work / "bpe.json", vocab_size=args.bpe_vocab)
        bpe_train_s = time.perf_counter() - t0

        if args.only_data_order:
            folders = {n: bench_prepare(corpus, work, "byte", "byte", 1, n)["folder"] for n in (256, 2048)}
            table = data_order_tables(bench_before_after(folders, args.seconds, work, args.baseline),
                                      bench_http(folders, args.seconds),
                                      bench_startup(*map(int, args.startup_shards.split("x"))))
            print(table)
            if args.output:
                Path(args.output).write_text(table + "\n", encoding="utf-8")
            return 0
        prep = []
        for w in workers:
            prep.append(bench_prepare(corpus, work, "byte", "byte", w, 256))
            prep.append(bench_prepare(corpus, work, str(work / "bpe.json"), f"bpe-{args.bpe_vocab}", w, 256))
        byte_2048 = bench_prepare(corpus, work, "byte", "byte", 1, 2048)

        byte_256 = next(p for p in prep if p["tokenizer"] == "byte" and p["workers"] == workers[0])
        streams = [bench_stream(byte_256["folder"], 256, args.seconds),
                   bench_stream(byte_2048["folder"], 2048, args.seconds),
                   bench_stream(byte_256["folder"], 256, args.seconds, num_workers=2)]
        folders = {256: byte_256["folder"], 2048: byte_2048["folder"]}
        order_tables = data_order_tables(bench_before_after(folders, args.seconds, work, args.baseline),
                                         bench_http(folders, args.seconds),
                                         bench_startup(*map(int, args.startup_shards.split("x"))))

    need = TINY_CONFIG_TOKENS_PER_S * REQUIRED_FACTOR
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; corpus: {corpus_bytes:,}"
        f" bytes of Python stdlib sources (default corpus); BPE trained in {bpe_train_s:.1f}s.",
        "",
        "| prepare | tokenizer | workers | seq_len | tokens | seconds | tokens/s | tokens/s per worker |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in prep + [byte_2048]:
        lines.append(f"| prepare | {p['tokenizer']} | {p['workers']} | {p['seq_len']} | {p['tokens']:,} | "
                     f"{p['seconds']:.2f} | {p['tok_s']:,.0f} | {p['tok_s_worker']:,.0f} |")
    lines += [
        "",
        f"| stream (byte tokens) | seq_len | micro_batch | DataLoader workers | samples | tokens/s | "
        f"x tiny config ({TINY_CONFIG_TOKENS_PER_S:,} tok/s) | >= {REQUIRED_FACTOR}x |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in streams:
        ok = "yes" if s["tok_s"] >= need else "NO"
        lines.append(f"| one reader | {s['seq_len']} | {s['micro_batch']} | {s['num_workers']} | {s['samples']:,} | "
                     f"{s['tok_s']:,.0f} | {s['tok_s'] / TINY_CONFIG_TOKENS_PER_S:,.0f}x | {ok} |")
    table = "\n".join(lines) + "\n\n" + order_tables
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")
    return 0 if all(s["tok_s"] >= need for s in streams[:2]) else 1


if __name__ == "__main__":
    sys.exit(main())
