"""The two SSMs of an H3 layer as kernels, recurrent steps and closed-form prefix states.

Shift SSM (per channel c, N taps): a learned causal FIR filter
    Ks[c, l] = sum_n Bs[c, n] * Cs[c, n + l]     (l < N, zero beyond).
Diagonal SSM (S4D-Lin, N/2 complex modes, bilinear discretization):
    dA = (1 + dt A / 2) / (1 - dt A / 2),   dB = B dt / (1 - dt A / 2)
    Kd[c, l] = 2 Re( sum_n C[c, n] dB[c, n] dA[c, n]^l ).
Every function is plain torch and differentiable; the tests compare each against
token-by-token recurrences and float64 direct sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hippo.kernels.fftconv import fftconv

__all__ = [
    "DiscreteDiagonalSSM",
    "discretize_diagonal",
    "diagonal_kernel",
    "diagonal_step",
    "diagonal_state_from_prefix",
    "shift_kernel",
    "shift_step",
    "shift_state_from_prefix",
]

# Vandermonde chunk for prefix states: bounds the (C, N/2, chunk) complex intermediate.
_PREFIX_CHUNK = 1024


# ----------------------------------------------------------------------------- shift SSM
def shift_kernel(B: torch.Tensor, C: torch.Tensor, length: int) -> torch.Tensor:
    """FIR taps of the shift SSM, truncated or zero-padded to `length`.

    Args:
        B, C: (channels, N) real.
    Returns:
        (channels, length).
    """
    N = B.shape[-1]
    # Cross-correlation of C with B: out[l] = sum_n B[n] C[n + l].
    taps = F.conv1d(F.pad(C.unsqueeze(0), (0, N - 1)), B.unsqueeze(1), groups=B.shape[0])[0]
    if length <= N:
        return taps[:, :length]
    return F.pad(taps, (0, length - N))


def shift_step(
    state: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token through the shift SSM.

    Args:
        state: (batch, channels, N), state[..., n] = sum_{m<=n} B[n-m] x_{t-1-m}.
        x: (batch, channels), the token x_t.
    Returns:
        y (batch, channels) = sum_n C * state' + D * x, and state' = shift_right(state) + B x.
    """
    new_state = F.pad(state[..., :-1], (1, 0)) + B * x.unsqueeze(-1)
    y = (C * new_state).sum(-1) + D * x
    return y, new_state


def shift_state_from_prefix(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Shift-SSM state after consuming a whole prefix, from its last N inputs.

    state[n] = sum_{m<=n} B[n-m] x[L-1-m]: a causal convolution of the reversed tail with B.

    Args:
        x: (batch, channels, L) prefix, any L >= 1.
        B: (channels, N).
    Returns:
        (batch, channels, N) in float32 (or float64 for float64 inputs).
    """
    N = B.shape[-1]
    tail = x[..., -N:].flip(-1)
    if tail.shape[-1] < N:
        tail = F.pad(tail, (0, N - tail.shape[-1]))
    return fftconv(tail.to(B.dtype), B)


# -------------------------------------------------------------------------- diagonal SSM
class DiscreteDiagonalSSM(NamedTuple):
    """Discretized diagonal SSM: everything a kernel, a step or a prefix state needs."""

    dA: torch.Tensor  # (channels, N/2) complex
    dB: torch.Tensor  # (channels, N/2) complex, includes B
    C: torch.Tensor  # (channels, N/2) complex


def discretize_diagonal(
    log_dt: torch.Tensor,
    log_A_real: torch.Tensor,
    A_imag: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> DiscreteDiagonalSSM:
    """Bilinear discretization of A = -exp(log_A_real) + i A_imag.

    Args:
        log_dt: (channels,); log_A_real, A_imag: (channels, N/2);
        B, C: (channels, N/2, 2) real views of complex tensors.
    """
    dt = torch.exp(log_dt).unsqueeze(-1)
    A = torch.complex(-torch.exp(log_A_real), A_imag)
    dtA_half = dt * A / 2
    denom = 1 - dtA_half
    dA = (1 + dtA_half) / denom
    dB = torch.view_as_complex(B.contiguous()) * dt / denom
    return DiscreteDiagonalSSM(dA=dA, dB=dB, C=torch.view_as_complex(C.contiguous()))


def _powers(dA: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """dA[..., n] ** exponents[l] -> (..., N/2, len(exponents)) via exp(l log dA)."""
    return torch.exp(torch.log(dA).unsqueeze(-1) * exponents.to(dA.real.dtype))


def diagonal_kernel(ssm: DiscreteDiagonalSSM, length: int) -> torch.Tensor:
    """Kd[c, l] = 2 Re(sum_n C dB dA^l), shape (channels, length), real."""
    steps = torch.arange(length, device=ssm.dA.device)
    vandermonde = _powers(ssm.dA, steps)  # (C, N/2, L)
    return 2 * torch.einsum("cn,cnl->cl", ssm.C * ssm.dB, vandermonde).real


def diagonal_step(
    state: torch.Tensor, x: torch.Tensor, ssm: DiscreteDiagonalSSM, D: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token through the diagonal SSM.

    Args:
        state: (batch, channels, N/2) complex.
        x: (batch, channels) real.
    Returns:
        y (batch, channels) = 2 Re(sum_n C * state') + D x, and state' = dA state + dB x.
    """
    new_state = ssm.dA * state + ssm.dB * x.unsqueeze(-1)
    y = 2 * (ssm.C * new_state).sum(-1).real + D * x
    return y.to(x.dtype), new_state


def diagonal_state_from_prefix(
    x: torch.Tensor, ssm: DiscreteDiagonalSSM, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Closed-form state after a prefix: dA^L x0 + sum_l dA^(L-1-l) dB x_l.

    Args:
        x: (batch, channels, L) real.
        initial_state: optional (batch, channels, N/2) complex x0.
    Returns:
        (batch, channels, N/2) complex.
    """
    L = x.shape[-1]
    chunk = min(L, _PREFIX_CHUNK)
    rdtype = ssm.dA.real.dtype
    # Reversed so that position m in the flipped sequence carries the power dA^m.
    rev = x.flip(-1).to(rdtype)
    powers = _powers(ssm.dA, torch.arange(chunk, device=x.device))  # (C, N/2, chunk)
    acc = torch.zeros(*x.shape[:-1], ssm.dA.shape[-1], dtype=ssm.dA.dtype, device=x.device)
    for start in range(0, L, chunk):
        part = rev[..., start : start + chunk]
        v = powers[..., : part.shape[-1]]
        # Real input times complex powers: two real contractions avoid a complex copy of x.
        s = torch.complex(
            torch.einsum("bcl,cnl->bcn", part, v.real), torch.einsum("bcl,cnl->bcn", part, v.imag)
        )
        acc = acc + (s * ssm.dA**start if start else s)
    state = acc * ssm.dB
    if initial_state is not None:
        state = state + initial_state * ssm.dA**L
    return state
