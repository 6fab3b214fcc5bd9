"""What checksums add to saving and loading a checkpoint of a paper-size model.

    python benchmarks/bench_checkpoint.py [--config hybrid_125m] [--threads 2]

Trains the config for 2 steps at a short sequence (the checkpoint's size depends on the
parameters, not on the sequence), checkpointing after each, then resumes it; reads the
trainer's own log lines ("written in X s, of which checksums Y s", "verified ... in Z s",
"loaded in W s") and prints one table of the ratios, all from this one run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from hippo.data_pipeline.default_corpus import write_default_corpus
from hippo.data_pipeline.prepare import prepare


def train(run: Path, data: Path, config: str, steps: int, threads: int) -> str:
    sets = [f"data.paths=[{data}]", "train.seq_len=64", "train.micro_batch_size=1", "train.global_batch_size=1",
            f"train.steps={steps}", "checkpoint.interval=1", "checkpoint.keep_last=5", "train.eval_interval=0",
            "train.eval_batches=1", "tracking.enabled=false", "--allow-config-change"]
    argv = [sys.executable, "-m", "hippo.pretrain.cli", "train", config, "--run-dir", str(run)]
    for s in sets:
        argv += ["--set", s] if "=" in s else [s]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="hybrid_125m")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_default_corpus(root / "corpus.jsonl", 400_000)
        prepare([corpus], root / "data", tokenizer="byte", seq_len=64, val_fraction=0.0, progress=False)
        first = train(root / "run", root / "data", args.config, 2, args.threads)
        resumed = train(root / "run", root / "data", args.config, 3, args.threads)
        size = sum(f.stat().st_size for f in (root / "run" / "checkpoints" / "global_step2").rglob("*") if f.is_file())
    saves = [(float(a), float(b)) for a, b in re.findall(r"written in ([\d.]+) s, of which checksums ([\d.]+) s", first)]
    verify = float(re.findall(r"verified .* in ([\d.]+) s", resumed)[0])
    load = float(re.findall(r"loaded in ([\d.]+) s", resumed)[0])
    save, hashing = saves[-1]
    print(f"{args.config}: checkpoint of {size / 2**30:.2f} GiB, {args.threads} threads\n")
    print("| | seconds | share |")
    print("|---|---:|---:|")
    print(f"| save (DeepSpeed + RNG + marker) | {save:.2f} | 1.00 |")
    print(f"| of which SHA-256 of every file | {hashing:.2f} | {hashing / save:.2f} |")
    print(f"| load (DeepSpeed load_checkpoint) | {load:.2f} | 1.00 |")
    print(f"| verification before load (sizes + SHA-256) | {verify:.2f} | {verify / load:.2f} of the load |")


if __name__ == "__main__":
    main()
