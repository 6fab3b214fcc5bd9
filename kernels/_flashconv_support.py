"""Where the Triton FlashConv kernels can run: pure functions of (capability, dtype, length).

No triton import: `kernels.h3_core` chooses its path with these on machines without triton,
and the launcher (`_flashconv_triton.flashconv_rows`) refuses the same cases with the same words.
The limits are the configurations the AOT compile check builds clean for sm_80 and sm_90
(tests/kernels/test_flashconv_compile.py): inside them every kernel fits shared memory, uses
tensor cores and does not spill.
"""

from __future__ import annotations

import torch

__all__ = [
    "FLASHCONV_DTYPES",
    "FP32_MAX_LEN",
    "MAX_FFT_SIZE",
    "MAX_LEN",
    "MIN_CAPABILITY",
    "MIN_FFT_SIZE",
    "block_fft_config",
    "flashconv_unsupported",
]

MIN_FFT_SIZE = 256  # N1 = N2 = 16: tl.dot needs every dimension >= 16
MAX_FFT_SIZE = 16384  # L = 8K in one kernel (128 x 128 on sm_8x, 256 x 64 on sm_90)
MAX_LEN = MAX_FFT_SIZE // 2
# fp32 uses 3xTF32 dots (`_flashconv_triton.FP32_DOT_PRECISION`): three tensor-core products per
# GEMM. Up to N = 4096 (L = 2048) they compile clean on both targets; from N = 8192 they need
# 304 KiB of shared memory on sm_80 (limit 163) and spill on sm_90, so fp32 stops at L = 2048.
FP32_MAX_LEN = 2048
# bf16 tensor cores, and the oldest target the compile check builds (sm_80).
MIN_CAPABILITY = (8, 0)
FLASHCONV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def block_fft_config(L: int) -> tuple[int, int, int]:
    """(N, N1, N2) for a causal conv of length L: N = max(256, next_pow2(2L)), N1 <= N2 square-ish."""
    n = max(MIN_FFT_SIZE, 1 << (2 * L - 1).bit_length())
    if n > MAX_FFT_SIZE:
        raise ValueError(f"flashconv (triton) handles L <= {MAX_LEN} in one kernel, got L={L}")
    log_n = n.bit_length() - 1
    n1 = 1 << (log_n // 2)
    return n, n1, n // n1


def flashconv_unsupported(capability: tuple[int, int] | None, dtype: torch.dtype, length: int) -> str | None:
    """None if the kernels have a clean configuration for this input, else why not.

    capability: the CUDA device's (major, minor), or None under the CPU interpreter (which runs
    the configuration table of `_flashconv_triton.INTERPRET_CAPABILITY`).
    """
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    if dtype not in FLASHCONV_DTYPES:
        return f"dtype {dtype} (the kernels take fp32 / fp16 / bf16)"
    if length > MAX_LEN:
        return f"L={length} > {MAX_LEN} (one-kernel block FFT limit)"
    if dtype == torch.float32 and length > FP32_MAX_LEN:
        return f"fp32 with L={length} > {FP32_MAX_LEN} (no clean fp32 configuration there; use bf16/fp16)"
    return None
