"""Causal long convolution by FFT, with a skip term.

`fftconv` is what models call; `fftconv_ref` is the direct O(L^2) oracle the tests hold it to.
The FFTs always run in float32 (or float64 for float64 inputs): cuFFT/pocketfft in half
precision lose too many bits over thousands of taps, and bf16 FFTs are not supported at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hippo.kernels import ops as _ops
from hippo.kernels.torch_compat import fft_c2c, fft_r2c

__all__ = ["causal_fftconv", "causal_fftconv_backward", "fftconv", "fftconv_ref", "fft_size"]


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

    The convolution runs as the op `hippo::fftconv` (`kernels.ops`, body `causal_fftconv`); the
    skip term stays outside it, in plain ops, so that autograd sums u's gradients from the skip,
    the convolution and any other use of u in the same order as without the op.
    """
    cdt = _compute_dtype(u.dtype)
    y = _ops.fftconv(u, k) if _ops.routed() else causal_fftconv(u, k)
    if D is not None:
        y = y + u.to(cdt) * D.to(cdt).unsqueeze(-1)
    return y.to(u.dtype)


def causal_fftconv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`fftconv` without the skip, in float32 (float64 for float64 u): (..., C, L)."""
    L = u.shape[-1]
    k = k[..., :L]
    cdt = _compute_dtype(u.dtype)
    n = fft_size(L, k.shape[-1])
    u_f = torch.fft.rfft(u.to(cdt), n=n)
    k_f = torch.fft.rfft(k.to(cdt), n=n)
    return torch.fft.irfft(u_f * k_f, n=n)[..., :L]


def causal_fftconv_backward(
    grad: torch.Tensor, u: torch.Tensor, k: torch.Tensor, needs: Sequence[bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `causal_fftconv` (u, k) as autograd forms them, op for op, so that the op's
    gradients equal the plain function's bit for bit: each FFT's backward is the one PyTorch
    registers (irfft: an rfft with the mirrored bins doubled; rfft: a zero-padded inverse c2c,
    real part), the product's are products with the conjugates, k's broadcast reduces by sum_to.
    The two spectra are recomputed (two rffts) instead of saved."""
    L, Lk = u.shape[-1], k.shape[-1]
    cdt = _compute_dtype(u.dtype)
    n = fft_size(L, min(L, Lk))
    u_c, k_c = u.to(cdt), k[..., :L].to(cdt)
    full = grad.new_zeros(*grad.shape[:-1], n)
    full[..., :L].copy_(grad)
    g_prod = fft_r2c(full)  # irfft's backward (norm by n)
    mirrored = n - g_prod.shape[-1]
    if mirrored > 0:
        g_prod.narrow(-1, 1, mirrored).mul_(2)

    def rfft_backward(g_f: torch.Tensor, size: int) -> torch.Tensor:
        nf = g_f.shape[-1]
        if n > nf:
            padded = g_f.new_zeros(*g_f.shape[:-1], n)
            padded[..., :nf].copy_(g_f)
            g_f = padded
        x = torch.real(fft_c2c(g_f))
        return torch.constant_pad_nd(x, (0, size - n))

    g_u = g_k = None
    if needs[0]:
        g_u = rfft_backward(g_prod * torch.fft.rfft(k_c, n=n).conj(), L).to(u.dtype)
    if needs[1]:
        g_kf = (g_prod * torch.fft.rfft(u_c, n=n).conj()).sum_to_size(*k_c.shape[:-1], n // 2 + 1)
        g_k = rfft_backward(g_kf, k_c.shape[-1]).to(k.dtype)
        if Lk > L:  # taps beyond L never reach an output
            padded = g_k.new_zeros(k.shape)
            padded[..., :L].copy_(g_k)
            g_k = padded
    return g_u, g_k


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
