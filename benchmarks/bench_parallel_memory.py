"""Per-rank parameter, gradient and optimizer-state memory of the paper's models under several
layouts, computed from the sharding (nothing allocated): `parallel.memory.rank_memory`.

    python benchmarks/bench_parallel_memory.py [--precision bf16]
    python benchmarks/bench_parallel_memory.py --long-context

Prints a Markdown table: GiB on the busiest rank, and its share of the single-GPU figure.
`--long-context`: with activations (`parallel.memory.activation_bytes`), which layouts of
hybrid_1.3b (bf16, ZeRO-1, one sequence per data-parallel rank) fit 80 GB GPUs at 128K, 512K
and 1M tokens per sequence on 8 and 64 GPUs.
"""

from __future__ import annotations

import argparse

from hippo.parallel.memory import GIB, rank_memory
from hippo.pretrain.config import ConfigError, load_config

SIZES = ["hybrid_125m", "hybrid_355m", "hybrid_1.3b", "hybrid_2.7b"]
# (tensor, pipeline, data, zero stage) on 8 or 64 GPUs.
LAYOUTS = [(1, 1, 1, 0), (1, 1, 8, 1), (1, 1, 8, 2), (2, 1, 4, 1), (2, 2, 2, 1), (4, 2, 1, 1), (8, 1, 1, 1), (4, 4, 4, 1)]


GPU_BYTES = 80 * 10**9
BUDGET = 0.9
"""Share of a GPU the estimate may fill: it leaves out fragmentation, one op's temporaries and
communication buffers."""


def long_context() -> None:
    print(f"hybrid_1.3b, bf16, ZeRO-1, micro batch 1; estimated GiB on the busiest rank (weights + gradients + "
          f"optimizer + activations); fits: <= {BUDGET:.0%} of 80 GB. Layouts TP x PP x CP x DP (+AC: activation "
          "checkpointing), TP <= 8.\n")
    print("| tokens per sequence | GPUs | layouts that fit (smallest estimate first) | smallest estimate GiB | "
          "fits / tried |")
    print("|---:|---:|---|---:|---:|")
    powers = [2**i for i in range(7)]
    for seq_len in (128 * 1024, 512 * 1024, 1024 * 1024):
        for gpus in (8, 64):
            fits, tried = [], 0
            for tp in (1, 2, 4, 8):
                for pp in (1, 2, 4):
                    for cp in powers:
                        if gpus % (tp * pp * cp):
                            continue
                        dp = gpus // (tp * pp * cp)
                        for ac in (False, True):
                            cfg = load_config("hybrid_1.3b", [
                                f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.context={cp}",
                                "parallel.zero_stage=1", f"parallel.activation_checkpointing={str(ac).lower()}",
                                f"train.seq_len={seq_len}", "train.micro_batch_size=1", f"train.global_batch_size={dp}"])
                            try:
                                layout = cfg.layout(gpus)
                            except ConfigError:
                                continue
                            tried += 1
                            mem = rank_memory(cfg.model, layout, precision="bf16", seq_len=seq_len)
                            if mem.total_bytes <= BUDGET * GPU_BYTES:
                                fits.append((mem.total_bytes, f"{tp}x{pp}x{cp}x{dp}{' +AC' if ac else ''}"))
            fits.sort()
            shown = ", ".join(f"{name} ({b / GIB:.0f})" for b, name in fits[:6]) + (" ..." if len(fits) > 6 else "")
            print(f"| {seq_len // 1024}K | {gpus} | {shown or 'none'} | "
                  f"{fits[0][0] / GIB if fits else float('nan'):.1f} | {len(fits)} / {tried} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--long-context", action="store_true")
    args = ap.parse_args()
    if args.long_context:
        return long_context()
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
