"""Per-rank parameter, gradient and optimizer-state memory of the paper's models under several
layouts, computed from the sharding (nothing allocated): `parallel.memory.rank_memory`.

    python benchmarks/bench_parallel_memory.py [--precision bf16]

Prints a Markdown table: GiB on the busiest rank, and its share of the single-GPU figure.
"""

from __future__ import annotations

import argparse

from hippo.parallel.memory import GIB, rank_memory
from hippo.pretrain.config import ConfigError, load_config

SIZES = ["hybrid_125m", "hybrid_355m", "hybrid_1.3b", "hybrid_2.7b"]
# (tensor, pipeline, data, zero stage) on 8 or 64 GPUs.
LAYOUTS = [(1, 1, 1, 0), (1, 1, 8, 1), (1, 1, 8, 2), (2, 1, 4, 1), (2, 2, 2, 1), (4, 2, 1, 1), (8, 1, 1, 1), (4, 4, 4, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args()
    print(f"precision {args.precision}; GiB per rank (busiest stage): weights / gradients / optimizer = total (vs TP1 PP1 DP1)\n")
    print("| model | TP x PP x DP, ZeRO | parameters per rank | weights | gradients | optimizer | total GiB | vs one GPU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in SIZES:
        single = None
        for tp, pp, dp, zero in LAYOUTS:
            cfg = load_config(size, [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.zero_stage={zero}",
                                     f"train.precision={args.precision}", f"train.global_batch_size={dp}", "train.micro_batch_size=1"])
            try:
                layout = cfg.layout(tp * pp * dp)
            except ConfigError as e:
                print(f"| {size} | {tp} x {pp} x {dp}, Z{zero} | refused: {e} | | | | | |")
                continue
            mem = rank_memory(cfg.model, layout, precision=cfg.train.precision)
            single = single or mem.total_bytes
            print(f"| {size} | {tp} x {pp} x {dp}, Z{zero} | {mem.parameters / 1e6:,.1f}M | {mem.weight_bytes / GIB:.2f} | "
                  f"{mem.gradient_bytes / GIB:.2f} | {mem.optimizer_bytes / GIB:.2f} | {mem.total_bytes / GIB:.2f} | "
                  f"{mem.total_bytes / single:.3f} |")


if __name__ == "__main__":
    main()
