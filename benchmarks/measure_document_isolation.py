"""Does document isolation change what a model learns? Held-out loss by position in the document.

    PYTHONPATH=. .venv/bin/python benchmarks/measure_document_isolation.py --out /tmp/iso
        [--models tiny_hybrid tiny_h3] [--steps 300] [--corpus-bytes 6000000] [--set key=value ...]

Documents are the Python standard library's sources (text no one here wrote), cut into their
top-level definitions (`stdlib_definitions`: whole files are too long for a 257-token window to
see their boundaries), prepared with the byte tokenizer at the configs' seq_len 256, 10% of the
documents held out. Each model trains twice with `hippo train` on the
same data, steps and seed, `model.document_isolation` off and on; then both exports score the same
held-out windows, and the loss of every target token is put in a bucket by its position in its
document. So that every boundary counts once and in the same place, the held-out windows are cut
from the validation split's token stream around each document boundary: half a window of
the previous document, its EOS, then the next document's first tokens.

- `first64`: document positions 1..63 (the token after the EOS is position 0; predicting it from the
  previous document is a guess either way, so it is left out, reported as `doc_start`);
- `rest`: positions >= 64 (tokens before a window's first EOS count when their window index is >= 64:
  their document began earlier, so they are at least that far in).

Tokens before a window's first EOS at window index < 64 are left out: their document position is
unknown. Each export is scored as it was trained (the isolated one isolates, the other reads across
EOS). CPU, fp32; each run is a few minutes on 2 free cores at the default 300 steps (the four
runs, data preparation and scoring: 11-12 min on a shared 2-core machine, one thread). At the
default 6 MB the corpus is 3,028 definitions of ~2,000 bytes: one boundary per ~2,000 tokens, 283
held-out windows (BENCHMARKS.md, "Document isolation: what it changes").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EARLY = 64
SEQ_LEN = 256  # tiny_hybrid's and tiny_h3's


def stdlib_definitions(path: Path, max_bytes: int) -> Path:
    """A .jsonl of documents: the top-level definitions of the standard library's modules (each
    `def` / `class` at column 0 with what follows it, and each module's header before the first),
    in file order, up to `max_bytes`. Whole source files are long (a 257-token window rarely
    holds a boundary); their definitions are many short documents, as the issue asks."""
    import re
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w") as out:
        for src in sorted(root.rglob("*.py")):
            if {"test", "tests", "site-packages", "idle_test"} & set(src.relative_to(root).parts):
                continue
            try:
                text = src.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for doc in re.split(r"\n(?=(?:def|class|async def) )", text):
                if not doc.strip():
                    continue
                line = json.dumps({"text": doc}) + "\n"
                if written + len(line) > max_bytes:
                    return path
                out.write(line)
                written += len(line)
    return path


def prepare_data(out: Path, corpus_bytes: int, seq_len: int) -> Path:
    from hippo.data_pipeline.prepare import prepare

    data = out / "data"
    if not (data / "manifest.json").is_file():
        corpus = stdlib_definitions(out / "corpus" / "stdlib_definitions.jsonl", corpus_bytes)
        prepare([corpus], data, tokenizer="byte", seq_len=seq_len, val_fraction=0.1, progress=False)
    return data


def train_run(out: Path, model: str, isolation: bool, data: Path, steps: int, overrides: list[str]) -> Path:
    run = out / f"{model}_{'on' if isolation else 'off'}"
    if not (run / "export").is_dir():
        sets = [f"data.paths=[{data}]", f"train.steps={steps}", f"model.document_isolation={str(isolation).lower()}",
                "tracking.enabled=false", "train.eval_interval=0", *overrides]
        cmd = [sys.executable, "-m", "hippo.pretrain.cli", "train", model, "--run-dir", str(run)]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return run / "export"


def position_buckets(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, L + 1) window -> (B, L) bucket of each target (ids[:, 1:]): 0 first64, 1 rest, 2 doc_start,
    -1 unknown (see the module docstring)."""
    B, L1 = ids.shape
    out = torch.full((B, L1 - 1), -1, dtype=torch.long)
    for b in range(B):
        start = None  # window index where the current document began, None before the first EOS
        for t in range(1, L1):
            if ids[b, t - 1] == eos:
                start = t
            pos = t - start if start is not None else None
            if pos == 0:
                out[b, t - 1] = 2
            elif pos is not None:
                out[b, t - 1] = 0 if pos < EARLY else 1
            elif t >= EARLY:
                out[b, t - 1] = 1
    return out


def boundary_windows(data: Path, config: str, seq_len: int, eos: int) -> torch.Tensor:
    """(N, seq_len + 1) held-out windows, one per document boundary: the validation split's token
    stream (its windows in order, end to end) cut around each EOS so that the new document begins
    in the middle of the window, after half a window of the previous one."""
    from hippo.data_pipeline.stream import build_stream
    from hippo.pretrain.config import load_config

    cfg = load_config(config, [f"data.paths=[{data}]"])
    stream = build_stream(dataclasses.replace(cfg.data, split="validation"), dp_rank=0, dp_size=1, micro_batch_size=1,
                          global_batch_size=1, one_pass=True)
    tokens = torch.cat([w.reshape(-1) for w in stream])
    half = seq_len // 2
    first = [e - half + 1 for e in (tokens == eos).nonzero().flatten().tolist()]  # the EOS at index half - 1
    pads = (tokens[1:] == eos) & (tokens[:-1] == eos)  # EOS runs: the padding of the split's last window
    first = [f for f in first if f >= 0 and f + seq_len + 1 <= len(tokens) and not pads[f : f + seq_len].any()]
    return torch.stack([tokens[f : f + seq_len + 1] for f in first]) if first else tokens.new_zeros(0, seq_len + 1)


BUCKETS = ("first64", "rest", "doc_start")


@torch.no_grad()
def score(export: Path, windows: torch.Tensor, eos: int, batch: int = 8) -> tuple[dict[str, float], torch.Tensor]:
    """Mean held-out loss and token count per bucket, and the (windows, 3) loss sums per window and
    bucket (for the paired comparison of two models on the same windows: `paired_difference`)."""
    from hippo.pretrain.models import HippoLM

    model = HippoLM.from_pretrained(export)
    per_window, counts = [], torch.zeros(3, dtype=torch.long)
    for window in windows.split(batch):
        logits = model(window[:, :-1])[..., : model.cfg.vocab_size]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="none").double()
        buckets = position_buckets(window, eos)
        per_window.append(torch.stack([(nll * (buckets == k)).sum(1) for k in range(3)], 1))
        counts += torch.stack([(buckets == k).sum() for k in range(3)])
    sums = torch.cat(per_window)
    out = {n: (sums[:, k].sum() / counts[k]).item() if counts[k] else math.nan for k, n in enumerate(BUCKETS)}
    out.update({f"{n}_tokens": int(counts[k]) for k, n in enumerate(BUCKETS)})
    return out, sums


def paired_difference(on: torch.Tensor, off: torch.Tensor, windows: torch.Tensor, eos: int) -> dict[str, list[float]]:
    """Per bucket, (on - off) mean loss over the same tokens and its standard error over windows
    (a ratio estimator: windows hold different numbers of a bucket's tokens). It measures how much
    the comparison depends on which held-out windows were drawn, not the spread between training
    seeds."""
    buckets = position_buckets(windows, eos)
    n = torch.stack([(buckets == k).sum(1) for k in range(3)], 1).double()  # (windows, 3)
    d = on - off
    delta = d.sum(0) / n.sum(0)
    resid = d - delta * n
    w = len(windows)
    se = (resid.pow(2).sum(0) * w / max(w - 1, 1)).sqrt() / n.sum(0)
    return {b: [delta[k].item(), se[k].item()] for k, b in enumerate(BUCKETS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", nargs="+", default=["tiny_hybrid", "tiny_h3"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--corpus-bytes", type=int, default=6_000_000)
    ap.add_argument("--eval-windows", type=int, default=400, help="held-out windows scored (one per boundary)")
    ap.add_argument("--set", action="append", default=[], help="config override for every run, key=value")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.out, args.corpus_bytes, SEQ_LEN)
    eos = json.loads((data / "manifest.json").read_text())["tokenizer"]["eos_id"]
    windows = boundary_windows(data, args.models[0], SEQ_LEN, eos)[: args.eval_windows]
    print(f"{len(windows)} held-out windows, each around one document boundary", flush=True)
    if not len(windows):
        raise SystemExit("no document boundary in the held-out split: raise --corpus-bytes")
    rows = []
    for model in args.models:
        sums = {}
        for isolation in (False, True):
            export = train_run(args.out, model, isolation, data, args.steps, args.set)
            scores, sums[isolation] = score(export, windows, eos)
            row = {"model": model, "isolation": isolation, "steps": args.steps, **scores}
            rows.append(row)
            print(f"{model:12s} isolation {'on ' if isolation else 'off'}: held-out loss first64 {row['first64']:.4f} "
                  f"({row['first64_tokens']} tokens)  rest {row['rest']:.4f} ({row['rest_tokens']})  "
                  f"doc_start {row['doc_start']:.4f} ({row['doc_start_tokens']})", flush=True)
        diff = paired_difference(sums[True], sums[False], windows, eos)
        rows.append({"model": model, "on_minus_off": diff})
        print(f"{model:12s} on - off (+- standard error over windows): "
              + "  ".join(f"{b} {d:+.4f} +- {e:.4f}" for b, (d, e) in diff.items()), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
