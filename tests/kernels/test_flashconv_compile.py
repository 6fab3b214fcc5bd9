"""Ahead-of-time GPU compile checks of every Triton FlashConv kernel config (no GPU needed).

For each kernel specialization, FFT size and target (sm_80, sm_90) that the launcher accepts
(`kernels._flashconv_support.flashconv_unsupported`, the same rule `h3_core`'s path choice uses)
at the shipped launch config (`kernels._flashconv_triton.launch_config`), what a GPU engineer
checks before running:
  - the block-FFT GEMMs lower to tensor-core instructions (mma.sync / wgmma.mma_async in PTX);
  - fp32 GEMMs are 3xTF32 (`cvt.rna.tf32.f32` operand splits in the PTX), not plain TF32;
  - shared memory per block fits the target (<= 163 KiB sm_80, <= 227 KiB sm_90);
  - no register spills: no ld/st.local in the PTX, no LDL/STL in the SASS, zero stack frame.
Known exceptions are strict xfails (they fail loudly once fixed, so the list stays true).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's default-change warning

import torch  # noqa: E402

from tests.kernels.flashconv_compile import (  # noqa: E402
    FLASHCONV_FFT_SIZES,
    SMEM_LIMIT_BYTES,
    compile_flashconv,
    flashconv_variants,
)
from hippo.kernels._flashconv_support import flashconv_unsupported  # noqa: E402

# (variant, dtype, N, capability) -> why it is not clean yet.
KNOWN_SPILLS: dict[tuple, str] = {}

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Every specialization h3_core(impl="triton") launches, in every input dtype, at every FFT size
# the launcher accepts on that target (the longest row of FFT size N is L = N / 2).
_CASES = [
    (v, dtype, n, cap)
    for dtype in ("bf16", "fp16", "fp32")
    for v, _, _ in flashconv_variants()
    for n in FLASHCONV_FFT_SIZES
    for cap in (80, 90)
    if flashconv_unsupported(divmod(cap, 10), _TORCH_DTYPES[dtype], n // 2) is None
]


def _param(case):
    marks = [pytest.mark.compile]
    if case in KNOWN_SPILLS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_SPILLS[case]))
    return pytest.param(*case, marks=marks, id="-".join(map(str, case)))


def _check(variant, dtype, n, cap):
    r = compile_flashconv(n, cap, dtype=dtype, variant=variant)
    assert r.mma + r.wgmma > 0, f"no tensor-core instruction in the PTX: {r}"
    if dtype == "fp32":
        assert r.tf32_splits > 0, f"fp32 GEMMs are plain TF32 (~1e-3 errors), not 3xTF32: {r}"
    else:
        assert r.tf32_splits == 0, f"16-bit GEMMs should not split operands: {r}"
    assert r.shared_bytes <= SMEM_LIMIT_BYTES[cap], f"shared memory {r.shared_bytes} B > sm_{cap} limit: {r}"
    assert (r.stack_bytes, r.local_ptx, r.local_sass) == (0, 0, 0), f"register spills: {r}"
    assert 0 < r.registers <= 255


@pytest.mark.parametrize("variant,dtype,n,cap", [_param(c) for c in _CASES])
def test_flashconv_kernel_compiles_clean(variant, dtype, n, cap):
    _check(variant, dtype, n, cap)


@pytest.mark.parametrize("cap", [80, 90])
def test_fused_h3_kernel_compiles_clean_smoke(cap):
    """The non-slow smoke check (~1 s per target): N = 2048 (L = 1024), fused H3 variant, bf16."""
    _check("fwd_h3", "bf16", 2048, cap)


@pytest.mark.parametrize("cap", [80, 90])
def test_fp32_kernel_is_3xtf32_and_clean_smoke(cap):
    """The largest fp32 config (N = 4096, L = 2048): 3xTF32 GEMMs on tensor cores, no spills.

    Fails on plain TF32 dots (no operand split) and on R = 32 frequency rows (spills on sm_90).
    """
    _check("fwd_h3", "fp32", 4096, cap)


def test_case_list_is_what_the_launcher_accepts():
    """fp32 stops at N = 4096 on both targets; bf16 / fp16 run every FFT size on both."""
    fp32 = {(n, cap) for v, d, n, cap in _CASES if d == "fp32" and v == "fwd_h3"}
    assert fp32 == {(n, cap) for n in (256, 512, 1024, 2048, 4096) for cap in (80, 90)}
    assert len([c for c in _CASES if c[1] == "bf16"]) == 4 * len(FLASHCONV_FFT_SIZES) * 2
