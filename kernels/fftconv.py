"""Causal long convolution by FFT, with a skip term.

`fftconv` is what models call; `fftconv_ref` is the direct O(L^2) oracle the tests hold it to.
The FFTs always run in float32 (or float64 for float64 inputs): cuFFT/pocketfft in half
precision lose too many bits over thousands of taps, and bf16 FFTs are not supported at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fftconv", "fftconv_ref", "fft_size"]


def fft_size(length: int, kernel_length: int) -> int:
    """Smallest FFT length that makes the first `length` outputs of a linear convolution exact.

    Rounded up to a power of two: pocketfft and cuFFT are several times faster there, and the
    extra padding never changes the causal outputs.
    """
    n = length + min(length, kernel_length) - 1
    return 1 << max(n - 1, 0).bit_length()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., c, l] = sum_{j<=l} k[c, j] u[..., c, l-j] + D[c] u[..., c, l].

    Args:
        u: (..., C, L) input, any float dtype.
        k: (C, Lk) causal kernel; taps beyond L are ignored, a shorter kernel is zero beyond Lk.
        D: optional (C,) skip weight.
    Returns:
        (..., C, L) in u's dtype.
    """
    L = u.shape[-1]
    k = k[..., :L]
    cdt = _compute_dtype(u.dtype)
    n = fft_size(L, k.shape[-1])
    u_f = torch.fft.rfft(u.to(cdt), n=n)
    k_f = torch.fft.rfft(k.to(cdt), n=n)
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :L]
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt).unsqueeze(-1)
    return y.to(u.dtype)


def fftconv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Direct causal convolution in float64: the independent oracle for `fftconv`.

    Same contract as `fftconv`; returns float64.
    """
    L = u.shape[-1]
    C = u.shape[-2]
    lead = u.shape[:-2]
    k = k[..., :L].to(torch.float64)
    x = u.reshape(-1, C, L).to(torch.float64)
    # conv1d is a cross-correlation: flip the kernel and left-pad so output l sees inputs <= l.
    weight = k.flip(-1).unsqueeze(1)  # (C, 1, Lk)
    y = F.conv1d(F.pad(x, (k.shape[-1] - 1, 0)), weight, groups=C)
    if D is not None:
        y = y + x * D.to(torch.float64).unsqueeze(-1)
    return y.reshape(*lead, C, L)
