"""The paper's Table 1 on this machine: last-token test accuracy of 2-layer models on the
synthetic languages, for H3, attention and the S4D-only baseline.

    python benchmarks/bench_synthetic.py [--epochs 400] [--loss all|last] [--tasks ...] [--mixers ...]

Prints one row per (task, mixer) and a Markdown table at the end.
"""

from __future__ import annotations

import argparse

import torch

from hippo.pretrain.synthetic import SyntheticConfig, run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=["associative_recall", "induction_head"])
    p.add_argument("--mixers", nargs="+", default=["h3", "attention", "s4d"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--loss", choices=["all", "last"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("loss", args.loss)) if v is not None}
    rows = []
    for task in args.tasks:
        for mixer in args.mixers:
            cfg = SyntheticConfig(task=task, mixer=mixer, seed=args.seed, **overrides)
            r = run(cfg, progress=False)
            rows.append((task, mixer, cfg, r))
            print(f"{task:20s} {mixer:10s} test_acc={r['test_accuracy']:.3f} epochs={r['epochs']} {r['seconds']:.0f}s", flush=True)
    print("\n| task | mixer | loss on | epoch budget | test accuracy | epochs run | seconds |\n|---|---|---|---:|---:|---:|---:|")
    for task, mixer, cfg, r in rows:
        print(f"| {task} | {mixer} | {cfg.loss} | {cfg.epochs} | {r['test_accuracy']:.3f} | {r['epochs']} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
