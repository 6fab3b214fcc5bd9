"""Ahead-of-time compile checks for the Triton FlashConv kernels, without a GPU.

`compile_flashconv(...)` builds one shipped config for a CUDA target (sm_80 / sm_90) through
`triton.compile(ASTSource(...), target=GPUTarget(...))`, then reads what a GPU engineer would:
tensor-core instructions in the PTX (and, for fp32, the 3xTF32 operand split that keeps them
fp32-accurate), shared memory per block, registers per thread, and spills
(local-memory traffic: `ld/st.local` in the PTX, `LDL/STL` in the SASS, the stack frame size
reported by `cuobjdump --dump-resource-usage` on the cubin). A checker, not part of the package:
used by `tests/kernels/test_flashconv_compile.py` and `benchmarks/bench_flashconv_compile.py`
(run with the repository root on PYTHONPATH).

Imports only triton (and the kernel module).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hippo.kernels._flashconv_triton import (
    FLASHCONV_FFT_SIZES,
    FP32_DOT_PRECISION,
    flashconv_fwd_kernel,
    launch_config,
)

__all__ = ["FLASHCONV_FFT_SIZES", "CompileReport", "SMEM_LIMIT_BYTES", "compile_flashconv", "flashconv_variants"]

# Max dynamic shared memory per block (opt-in): sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
SMEM_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}

_TL_DTYPES = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
_FP32_PTRS = ("kr_ptr", "ki_ptr", "d_ptr", "twr_ptr", "twi_ptr")
_IO_PTRS = ("u_ptr", "v_ptr", "q_ptr", "y_ptr", "f1r_ptr", "f1i_ptr", "f2r_ptr", "f2i_ptr")  # in the input dtype
_INTS = ("L", "C") + tuple(f"stride_{t}{d}" for t in "uvqy" for d in "bcl")


@dataclass
class CompileReport:
    kernel: str
    fft_size: int
    n1: int
    n2: int
    rows: int  # R, frequency rows per loop step
    num_warps: int
    dtype: str
    capability: int
    shared_bytes: int
    registers: int
    stack_bytes: int
    local_ptx: int  # ld/st.local instructions in the PTX
    local_sass: int  # LDL/STL instructions in the SASS
    mma: int  # mma.sync (sm_80-style) instructions in the PTX
    wgmma: int  # wgmma.mma_async (sm_90) instructions in the PTX
    tf32_splits: int  # cvt.rna.tf32.f32 in the PTX: 3xTF32's big halves (fp32 inputs; 0 for plain tf32)


def flashconv_variants():
    """(name, constexpr flags, fp32 output?) of every specialization `h3_core(impl="triton")` launches.

    fwd_h3:   y = q (conv(k' v, Kd) + D k' v), output in the input dtype.
    conv_d:   k' = conv(k, Ks) + Dk k (the shift SSM), output in the input dtype.
    bwd_h3:   fp32 output, pre-multiply, skip: dw = corr(dy q, Kd) + D dy q, and the recompute
              of s = conv(k' v, Kd) + D k' v for dq (same specialization).
    bwd_conv: fp32 output, skip only: the shift SSM's input gradient corr(dk', Ks) + Dk dk'.
    """
    return (
        ("fwd_h3", dict(HAS_V=True, HAS_Q=True, HAS_D=True), False),
        ("conv_d", dict(HAS_V=False, HAS_Q=False, HAS_D=True), False),
        ("bwd_h3", dict(HAS_V=True, HAS_Q=False, HAS_D=True), True),
        ("bwd_conv", dict(HAS_V=False, HAS_Q=False, HAS_D=True), True),
    )


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_flashconv(
    fft_size: int, capability: int, dtype: str = "bf16", variant: str = "fwd_h3", **overrides
) -> CompileReport:
    """Compile `flashconv_fwd_kernel` at the shipped `launch_config(fft_size)` (or `overrides`)."""
    cfg = launch_config(fft_size, capability, fp32=dtype == "fp32")
    cfg = {"FP32_PRECISION": FP32_DOT_PRECISION, **cfg, **overrides}
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    flags, fp32_out = {name: (f, o) for name, f, o in flashconv_variants()}[variant]
    constexprs = dict(**cfg, DOT_DTYPE=_TL_DTYPES[dtype], EMULATE=False, **flags)
    sig = {name: "*fp32" for name in _FP32_PTRS}
    sig.update({name: f"*{dtype}" for name in _IO_PTRS})
    if fp32_out:
        sig["y_ptr"] = "*fp32"
    sig.update({name: "i32" for name in _INTS})
    sig.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(
        ASTSource(fn=flashconv_fwd_kernel, signature=sig, constexprs=constexprs),
        target=GPUTarget("cuda", capability, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return CompileReport(
        kernel=f"flashconv_fwd_kernel[{variant}]",
        fft_size=fft_size, n1=cfg["N1"], n2=cfg["N2"], rows=cfg["R"], num_warps=num_warps, dtype=dtype,
        capability=capability,
        shared_bytes=compiled.metadata.shared,
        registers=regs,
        stack_bytes=stack,
        local_ptx=len(re.findall(r"\b(?:ld|st)\.local", ptx)),
        local_sass=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        mma=len(re.findall(r"\bmma\.sync\.", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        tf32_splits=len(re.findall(r"\bcvt\.rna\.tf32\.f32\b", ptx)),
    )
