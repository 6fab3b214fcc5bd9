"""Data pipeline throughput: prepare (tokens/s per worker) and streaming (tokens/s for one reader).

Uses the embedded default corpus (Python stdlib sources), so it runs anywhere with nothing to
download. Prepare is timed end to end (read, tokenize, pack, compress, write, manifest) with
the byte tokenizer and a byte-level BPE trained here; streaming reads the byte-tokenized
shards with `build_stream` in the calling process (num_workers=0, one torch thread), micro
batch 8, and counts seq_len tokens per sample (what the trainer consumes per sample).

    python benchmarks/bench_data_pipeline.py [--corpus-mb 8] [--seconds 5] [--output results.md]
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


import torch

from hippo.data_pipeline.config import DataConfig
from hippo.data_pipeline.default_corpus import write_default_corpus
from hippo.data_pipeline.prepare import prepare
from hippo.data_pipeline.sources import iter_texts
from hippo.data_pipeline.stream import build_stream
from hippo.data_pipeline.tokenizer import train_bpe_tokenizer

TINY_CONFIG_TOKENS_PER_S = 20_000  # the tiny CPU training config (to be confirmed by the trainer benchmark)
REQUIRED_FACTOR = 50


def bench_prepare(corpus: Path, work: Path, tokenizer: str, label: str, workers: int, seq_len: int) -> dict:
    out = work / f"prep-{label}-w{workers}-{seq_len}"
    t0 = time.perf_counter()
    m = prepare([corpus], out, tokenizer=tokenizer, seq_len=seq_len, workers=workers, shard_bytes=4 << 20,
                progress=False, overwrite=True)
    dt = time.perf_counter() - t0
    tokens = m.splits["train"].tokens
    return {"tokenizer": label, "workers": workers, "seq_len": seq_len, "tokens": tokens, "seconds": dt,
            "tok_s": tokens / dt, "tok_s_worker": tokens / dt / workers, "folder": out}


OLD_ORDER = dict(virtual_streams=8, shuffle_window=1024, order_version=1)
"""The sample order of runs begun before the 3072-stream default (Hippo 0.1/0.2)."""


def bench_stream(folder: Path, seq_len: int, seconds: float, micro_batch: int = 8, num_workers: int = 0,
                 dp_size: int = 1, order: dict | None = None) -> dict:
    cfg = DataConfig(paths=[str(folder)], num_workers=num_workers, **(order or {}))
    stream = build_stream(cfg, dp_rank=0, dp_size=dp_size, micro_batch_size=micro_batch,
                          global_batch_size=micro_batch * dp_size)
    it = iter(stream)
    for _ in range(10):  # warm-up: first blocks, worker start-up
        next(it)
    t0 = time.perf_counter()
    samples = 0
    while time.perf_counter() - t0 < seconds:
        samples += next(it).shape[0]
    dt = time.perf_counter() - t0
    return {"seq_len": seq_len, "micro_batch": micro_batch, "num_workers": num_workers, "samples": samples,
            "seconds": dt, "tok_s": samples * seq_len / dt, "epoch_samples": stream.samples_per_epoch}


def bench_stream_counts(folders: dict[int, Path], seconds: float, rounds: int = 2) -> list[dict]:
    """One rank's reading speed with the old 8-stream order and the 3072-stream default, rounds
    interleaved (best of `rounds` each), at DP 1 (3072 streams on one rank, over the open-shard
    cap) and DP 16 (192 streams per rank; the old order cannot serve DP 16, so it is read at DP 8)."""
    rows = []
    for seq_len, folder in folders.items():
        for dp_new, dp_old in ((1, 1), (16, 8)):
            best = {"old": 0.0, "new": 0.0}
            for _ in range(rounds):
                best["old"] = max(best["old"], bench_stream(folder, seq_len, seconds, dp_size=dp_old,
                                                            order=OLD_ORDER)["tok_s"])
                best["new"] = max(best["new"], bench_stream(folder, seq_len, seconds, dp_size=dp_new)["tok_s"])
            rows.append({"seq_len": seq_len, "dp_new": dp_new, "dp_old": dp_old, **best})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-mb", type=float, default=8.0, help="default-corpus text to prepare (MB)")
    ap.add_argument("--bpe-vocab", type=int, default=8192, help="vocabulary of the BPE trained for the benchmark")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each streaming measurement")
    ap.add_argument("--workers", default="1,2", help="prepare worker counts to measure")
    ap.add_argument("--output", help="also write the Markdown table here")
    ap.add_argument("--only-stream-counts", action="store_true",
                    help="only the 8-stream vs 3072-stream reading comparison")
    args = ap.parse_args()
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

        if args.only_stream_counts:
            folders = {n: bench_prepare(corpus, work, "byte", "byte", 1, n)["folder"] for n in (256, 2048)}
            table = stream_count_table(bench_stream_counts(folders, args.seconds))
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
        counts = bench_stream_counts({256: byte_256["folder"], 2048: byte_2048["folder"]}, args.seconds)

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
    table = "\n".join(lines) + "\n\n" + stream_count_table(counts)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")
    return 0 if all(s["tok_s"] >= need for s in streams[:2]) else 1


def stream_count_table(rows: list[dict]) -> str:
    lines = ["| seq_len | 8 streams (old order): DP, tokens/s per rank | 3072 streams (default): DP, tokens/s per rank "
             "| default / old |", "|---:|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | DP {r['dp_old']}: {r['old']:,.0f} | DP {r['dp_new']}: {r['new']:,.0f} | "
                     f"{r['new'] / r['old']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
