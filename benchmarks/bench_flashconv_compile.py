"""Compile every Triton FlashConv kernel config for sm_80 and sm_90 (no GPU needed) and print
registers, shared memory, spills and tensor-core instruction counts, with a roofline estimate of
the H100 time per call.

    PYTHONPATH=. TRITON_DEFAULT_FP_FUSION=1 python benchmarks/bench_flashconv_compile.py [--dtypes bf16,fp16,fp32]

Roofline (a lower bound, not a measurement): per (batch, channel) row the kernel does the block
FFT's real GEMMs, N (4 H + 8 N2) multiply-adds (two GEMMs of F_N1 against the H data rows, four
complex-by-F_N2 GEMMs each way, two of F_N1 back onto H output rows), and moves its inputs and
output once through HBM (2 bytes per element for bf16/fp16, 4 for fp32) plus the kernel spectrum
(8 bytes per frequency per channel, read once per call: it is shared by the batch through L2).
H100 SXM peaks: 989 TFLOP/s dense bf16/fp16 (495 tf32), 3.35 TB/s HBM3.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from tests.kernels.flashconv_compile import (
    FLASHCONV_FFT_SIZES,
    SMEM_LIMIT_BYTES,
    compile_flashconv,
    flashconv_variants,
)
from hippo.kernels._flashconv_support import flashconv_unsupported
from hippo.kernels._flashconv_triton import launch_config

H100_FLOPS = {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12}
H100_HBM = 3.35e12
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (input rows read, output in fp32?) per (batch, channel) row.
_IO = {"fwd_h3": (3, False), "conv_d": (1, False), "bwd_h3": (2, True), "bwd_conv": (1, True)}


def roofline_us(n: int, variant: str, dtype: str, batch: int = 4, channels: int = 768) -> tuple[float, float, float]:
    """(GFLOP, MB, microseconds) per call at (batch, channels) and L = n / 2 on an H100."""
    cfg = launch_config(n, 90)
    L = n // 2
    rows = batch * channels
    flops = rows * 2 * n * (4 * cfg["H"] + 8 * cfg["N2"])
    n_in, fp32_out = _IO[variant]
    bytes_ = rows * L * (n_in * _BYTES[dtype] + (4 if fp32_out else _BYTES[dtype])) + channels * n * 8
    t = max(flops / H100_FLOPS[dtype], bytes_ / H100_HBM)
    return flops / 1e9, bytes_ / 1e6, t * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    args = ap.parse_args()
    print("| kernel | dtype | N (L = N/2) | target | N1 x N2, R, warps | regs | shared KiB (limit) | spill: stack B / LDL+STL | mma / wgmma in PTX | H100 roofline B=4 H=768 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    t0 = time.time()
    for dtype in args.dtypes.split(","):
        for variant, _, _ in flashconv_variants():
            for n in FLASHCONV_FFT_SIZES:
                for cap in (80, 90):
                    why = flashconv_unsupported((cap // 10, cap % 10), _TORCH_DTYPES[dtype], n // 2)
                    if why:  # the same rule the path selection applies (kernels/_flashconv_support.py)
                        print(f"| {variant} | {dtype} | {n} | sm_{cap} | not shipped: {why} |||||| ")
                        continue
                    r = compile_flashconv(n, cap, dtype=dtype, variant=variant)
                    roof = ""
                    if cap == 90:
                        gf, mb, us = roofline_us(n, variant, dtype)
                        roof = f"{gf:.1f} GFLOP, {mb:.0f} MB: {us:.1f} us"
                    print(
                        f"| {variant} | {dtype} | {n} | sm_{cap} | {r.n1}x{r.n2}, {r.rows}, {r.num_warps} | {r.registers} "
                        f"| {r.shared_bytes / 1024:.0f} ({SMEM_LIMIT_BYTES[cap] // 1024}) | {r.stack_bytes} / {r.local_sass} "
                        f"| {r.mma} / {r.wgmma} | {roof} |",
                        flush=True,
                    )
    print(f"\n(compiled in {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
