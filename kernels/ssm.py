"""The two SSMs of an H3 layer as kernels, decode steps and closed-form prefix states.

Shift SSM (per channel c, N taps): a learned causal FIR filter
    Ks[c, l] = sum_n Bs[c, n] * Cs[c, n + l]     (l < N, zero beyond).
Diagonal SSM (S4D-Lin, N/2 complex modes, bilinear discretization):
    dA = (1 + dt A / 2) / (1 - dt A / 2),   dB = B dt / (1 - dt A / 2)
    Kd[c, l] = 2 Re( sum_n C[c, n] dB[c, n] dA[c, n]^l ).
Every function is plain torch and differentiable (but the decode steps, which update their
state in place for generation); the tests compare each against token-by-token recurrences
(`tests/kernels/ssm_ref.py`) and float64 direct sums. Powers dA^l come from `dA_powers` only.

`diagonal_kernel` never forms the (C, N/2, L) complex Vandermonde dA^l (1.3 GB for 2,560
channels at L = 2,048): it factors dA^(aP + b) = dA^(aP) dA^b into blocks of P, so forward is one
real (C, L/P, N) x (C, N, P) product, and its autograd Function saves only C dB and dA,
recomputing those small factors in backward. Activation memory is O(channels x L).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hippo.kernels import ops as _ops

__all__ = [
    "DiscreteDiagonalSSM",
    "discretize_diagonal",
    "dA_powers",
    "diagonal_kernel",
    "diagonal_state_from_prefix",
    "DiagonalDecoder",
    "diagonal_decoder",
    "diagonal_decode_state",
    "diagonal_decode_step",
    "shift_kernel",
    "shift_ring_taps",
    "shift_ring_from_prefix",
    "shift_ring_step",
]

# Block P of the factored kernel dA^(aP + b) = dA^(aP) dA^b: intermediates are (C, N/2, L/P) and
# (C, N/2, P), smallest near P = sqrt(L); 64 keeps both small up to L = 16K.
_KERNEL_BLOCK = 64
# `dA_powers`: up to this many exponents each in polar form (a kernel block's P = 64 included);
# longer consecutive runs from running products in blocks of _POWER_RUN.
_DIRECT_POWERS = 64
_POWER_RUN = 8


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


# Recurrent decoding keeps the shift SSM's input window in a ring instead of shifting a
# (batch, channels, N) state every token: one strided write of the new input and one batched
# (1 x N) @ (N x batch) product per channel, reading the window once.
def shift_ring_taps(B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The shift SSM's N taps (D folded into tap 0) in ring order, twice: (channels, 2N).

    A ring window holds x_tau in slot tau mod N. At time t (slot p = t mod N) slot s holds
    x_{t - j} with j = (p - s) mod N, weighted by K[j] = taps[:, N - p + s]: the N weights of
    step t are the contiguous slice taps[:, N - p : 2N - p].
    """
    N = B.shape[-1]
    with torch.autocast(B.device.type, enabled=False):  # conv1d: autocast would take it to bf16
        K = shift_kernel(B, C, N).clone()
    K[:, 0] += D
    G = torch.cat((K[:, :1], K[:, 1:].flip(-1)), dim=-1)  # G[j] = K[(-j) mod N]
    return torch.cat((G, G), dim=-1)


def shift_ring_from_prefix(x: torch.Tensor, N: int) -> torch.Tensor:
    """Ring window after a prefix x (batch, channels, L): (channels, N, batch), slot tau mod N
    holding x_tau for the last min(L, N) positions tau, zeros for the positions before 0."""
    Bt, Ch, L = x.shape
    window = x.new_zeros(Ch, N, Bt)
    n = min(L, N)
    slots = torch.arange(L - n, L, device=x.device) % N
    window[:, slots, :] = x[..., L - n :].permute(1, 2, 0)
    return window


def shift_ring_step(window: torch.Tensor, taps: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """Token x_t (batch, channels) through the shift SSM: writes it into `window` (in place,
    slot t mod N) and returns y_t (batch, channels) = sum_j K[j] x_{t-j} + D x_t, as the
    shifted-state recurrence computes it (`tests/kernels/ssm_ref.shift_step_ref`).
    The op `hippo::shift_ring_step`, body `shift_ring_step_impl`."""
    if _ops.routed():
        return _ops.shift_ring_step(window, taps, x, t)
    return shift_ring_step_impl(window, taps, x, t)


def shift_ring_step_impl(window: torch.Tensor, taps: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    N = window.shape[1]
    p = t % N
    with torch.autocast(x.device.type, enabled=False):  # bmm: autocast would take it to bf16
        window[:, p, :] = x.T
        return torch.bmm(taps[:, None, N - p : 2 * N - p], window)[:, 0].T


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


def dA_powers(dA: torch.Tensor, exponents: range) -> torch.Tensor:
    """dA^e for every e in `exponents` (integers >= 0): complex128, shape (*dA.shape, len(exponents)).

    The one place powers of the discretized state matrix are formed (kernel, prefix state,
    state-to-output term, chunk matrices, cross-chunk decay, references), so every path agrees
    with every other to float64 rounding. Precision is why it is shared: complex64
    exp(e log dA) loses ~e * 6e-8 rad of phase, a 1e-4 relative error in the kernel at e = 8K.

    - Up to `_DIRECT_POWERS` exponents, or a strided range: each power in float64 polar form,
      |dA|^e (cos e theta + i sin e theta), ~1e-15 relative at any e.
    - A longer run of consecutive exponents: dA^(start + 8a + b) = dA^start (dA^8)^a dA^b from
      two running products of <= 8 and n / 8 factors (dA^start in polar form). A polar power
      costs ~10x a complex multiply and the chunked path forms 65 powers per mode on every call;
      the error grows by one rounding per 8 exponents (~1e-13 at n = 8K, references only).
    A range (not a tensor) keeps that choice on the host.
    """
    z = dA.to(torch.complex128)
    n = len(exponents)
    if exponents.step != 1 or n <= _DIRECT_POWERS:
        return _polar_powers(z, exponents)
    # Exponents on the second-to-last axis while building (the running products run over
    # contiguous rows); the result is a transposed view, so a (C, n, N/2) consumer copies nothing.
    S = _POWER_RUN
    z1 = z.unsqueeze(-2)
    ones = torch.ones_like(z1)
    small = torch.cumprod(torch.cat((ones, z1.expand(*z.shape[:-1], S - 1, z.shape[-1])), dim=-2), dim=-2)  # dA^0..S-1
    step = small[..., S - 1 :, :] * z1  # dA^S
    big = torch.cumprod(torch.cat((ones, step.expand(*z.shape[:-1], -(-n // S) - 1, z.shape[-1])), dim=-2), dim=-2)
    run = (big.unsqueeze(-2) * small.unsqueeze(-3)).flatten(-3, -2)[..., :n, :].transpose(-1, -2)
    if exponents.start:
        run = run * _polar_powers(z, range(exponents.start, exponents.start + 1))
    return run


def _polar_powers(z: torch.Tensor, exponents: range) -> torch.Tensor:
    """z^e (..., N/2, len(e)) for complex128 z, each formed in float64 polar form."""
    e = torch.arange(exponents.start, exponents.stop, exponents.step, dtype=torch.float64, device=z.device)
    modulus = torch.exp(torch.log(z.abs()).unsqueeze(-1) * e)
    phase = z.angle().unsqueeze(-1) * e
    # What torch.polar computes, at less than half its CPU time (its complex kernel is not vectorized).
    return torch.complex(modulus * torch.cos(phase), modulus * torch.sin(phase))


def _block_factors(dA: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """dA^(aP) (C, N/2, A) and dA^b (C, N/2, P), A P >= length, in dA's complex dtype: only
    (C, N/2, A + P) numbers, each formed exactly (`dA_powers`)."""
    P = max(1, min(_KERNEL_BLOCK, length))
    A = -(-length // P)
    return dA_powers(dA, range(0, A * P, P)).to(dA.dtype), dA_powers(dA, range(P)).to(dA.dtype), P


def _blocked_sums(w: torch.Tensor, big: torch.Tensor, small: torch.Tensor, P: int) -> torch.Tensor:
    """sum_l w[..., c, l] dA[c, n]^l for real weights w (k, C, l < A P) -> (k, C, N/2) complex.

    sum_a dA^(aP) sum_b w[aP + b] dA^b: one real batched matmul over the blocks b, then a
    contraction with the (C, N/2, A) factor.
    """
    k, C, l = w.shape
    A = big.shape[-1]
    n2 = small.shape[1]
    wb = F.pad(w, (0, A * P - l)).view(k, C, A, P).permute(1, 0, 2, 3).reshape(C, k * A, P)
    right = torch.cat((small.real, small.imag), dim=1).transpose(1, 2)  # (C, P, N)
    inner = torch.bmm(wb, right).view(C, k, A, 2, n2)  # sum_b w dA^b, re | im
    inner = torch.complex(inner[..., 0, :], inner[..., 1, :])  # (C, k, A, N/2)
    return torch.einsum("ckan,cna->kcn", inner, big)


class _DiagonalKernel(torch.autograd.Function):
    """Kd[c, l] = 2 Re(sum_n cb[c, n] dA[c, n]^l) from cb = C dB and dA, both (C, N/2) complex.

    Saves only cb and dA: backward recomputes the small block factors and contracts the
    incoming (C, L) gradient with them, so nothing of size (C, N/2, L) exists in either pass.
    With g = dLoss/dKd and PyTorch's convention grad = dLoss/dRe + i dLoss/dIm:
        grad_cb = 2 sum_l g_l conj(dA^l)
        grad_dA = 2 conj(cb sum_l l g_l dA^(l-1)) = 2 conj(cb sum_m (m+1) g_{m+1} dA^m).
    Backward is written in differentiable torch ops, so double backward works too.
    """

    @staticmethod
    def forward(ctx, cb: torch.Tensor, dA: torch.Tensor, length: int) -> torch.Tensor:
        ctx.save_for_backward(cb, dA)
        ctx.length = length
        C = dA.shape[0]
        big, small, P = _block_factors(dA, length)
        A = big.shape[-1]
        coef = cb.to(dA.dtype).unsqueeze(-1) * big  # (C, N/2, A): C dB dA^(aP)
        # 2 Re(coef dA^b) = 2 (coef.re small.re - coef.im small.im)
        left = torch.cat((2 * coef.real, -2 * coef.imag), dim=1).transpose(1, 2)  # (C, A, N)
        right = torch.cat((small.real, small.imag), dim=1)  # (C, N, P)
        return torch.bmm(left, right).view(C, A * P)[:, :length]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cb, dA = ctx.saved_tensors
        L = ctx.length
        rdtype = dA.real.dtype
        big, small, P = _block_factors(dA, L)
        g = grad.to(rdtype)
        steps = torch.arange(1, max(L, 1), device=g.device, dtype=rdtype)
        h = F.pad(g[:, 1:] * steps, (0, 1))[:, :L]  # h[m] = (m+1) g[m+1], zero at m = L-1
        s = _blocked_sums(torch.stack((g, h)), big, small, P)  # (2, C, N/2) in dA's dtype
        grad_cb = grad_dA = None
        if ctx.needs_input_grad[0]:
            grad_cb = (2 * s[0].conj()).to(cb.dtype)
        if ctx.needs_input_grad[1]:
            grad_dA = (2 * (cb * s[1].to(cb.dtype)).conj()).to(dA.dtype)
        return grad_cb, grad_dA, None


def diagonal_kernel(ssm: DiscreteDiagonalSSM, length: int) -> torch.Tensor:
    """Kd[c, l] = 2 Re(sum_n C dB dA^l), shape (channels, length), real (dA's real dtype).

    Blocked (see `_DiagonalKernel`): no (C, N/2, L) intermediate and O(C N) saved for backward.
    """
    cb = ssm.C * ssm.dB
    return _ops.diagonal_kernel(cb, ssm.dA, length) if _ops.routed() else _DiagonalKernel.apply(cb, ssm.dA, length)


class DiagonalDecoder(NamedTuple):
    """A discretized diagonal SSM laid out for `diagonal_decode_step` (from `diagonal_decoder`)."""

    dA: torch.Tensor  # (channels, 1, N/2) complex
    out: torch.Tensor  # (channels, 1, N) real: (2 Re, -2 Im) of C dB per mode, interleaved
    D: torch.Tensor  # (channels, 1) real skip


def diagonal_decoder(ssm: DiscreteDiagonalSSM, D: torch.Tensor) -> DiagonalDecoder:
    cdb = ssm.C * ssm.dB
    out = torch.stack((2 * cdb.real, -2 * cdb.imag), dim=-1).flatten(1).unsqueeze(1)
    return DiagonalDecoder(dA=ssm.dA.unsqueeze(1), out=out.contiguous(), D=D.unsqueeze(-1))


def diagonal_decode_state(state: torch.Tensor, ssm: DiscreteDiagonalSSM) -> torch.Tensor:
    """The recurrence's state (batch, channels, N/2) -> the decode state (channels, batch, N/2).

    The decode state is s = state / dB: then s' = dA s + x takes the input unscaled (one
    broadcast add instead of a (batch, channels, N/2) product) and y = 2 Re(sum_n C dB s') + D x.
    Modes with dB = 0 carry nothing to y and are kept at 0.
    """
    s = torch.where(ssm.dB != 0, state / torch.where(ssm.dB != 0, ssm.dB, 1), 0)
    return s.transpose(0, 1).contiguous()


def diagonal_decode_step(s: torch.Tensor, dec: DiagonalDecoder, x: torch.Tensor) -> torch.Tensor:
    """Token x (batch, channels) through the diagonal SSM: updates `s` (channels, batch, N/2)
    in place to dA s + x and returns y (batch, channels) = 2 Re(sum_n C dB s') + D x, as the
    recurrence state' = dA state + dB x computes it (`tests/kernels/ssm_ref.diagonal_step_ref`).
    Two in-place passes over the state and one batched product reading it (per channel:
    (1 x N) @ (N x batch) over its real and imaginary parts). The op `hippo::diagonal_decode_step`,
    body `diagonal_decode_step_impl`."""
    if _ops.routed():
        return _ops.diagonal_decode_step(s, dec.dA, dec.out, dec.D, x)
    return diagonal_decode_step_impl(s, dec, x)


def diagonal_decode_step_impl(s: torch.Tensor, dec: DiagonalDecoder, x: torch.Tensor) -> torch.Tensor:
    C, Bt, M = s.shape
    with torch.autocast(x.device.type, enabled=False):  # bmm: autocast would take it to bf16
        s_real = torch.view_as_real(s)
        # In the state's precision: an fp32 SSM's decoder runs a float64 model's (prefilled) state too.
        xt, out, D = (a.to(s_real.dtype) for a in (x.T, dec.out, dec.D))
        s.mul_(dec.dA)
        s_real[..., 0].add_(xt.unsqueeze(-1))  # x is real: add it to the real parts, no complex copy
        y = torch.bmm(out, s_real.view(C, Bt, 2 * M).transpose(1, 2))[:, 0]
        return torch.addcmul(y, D, xt).T


def diagonal_state_from_prefix(
    x: torch.Tensor, ssm: DiscreteDiagonalSSM, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """Closed-form state after a prefix: dA^L x0 + sum_l dA^(L-1-l) dB x_l.

    Blocked with the kernel's own powers (`_block_factors`, `dA_powers`), so a state and the
    kernel's response agree to rounding: a chunk's state under context parallelism (S4D) then
    reproduces the full-length kernel's outputs (complex64 exp(l log dA) was 2e-5 off at CP 8).

    Args:
        x: (batch, channels, L) real.
        initial_state: optional (batch, channels, N/2) complex x0.
    Returns:
        (batch, channels, N/2) complex.
    """
    L = x.shape[-1]
    rev = x.flip(-1).to(ssm.dA.real.dtype)  # position m of the flipped sequence carries dA^m
    state = _blocked_sums(rev, *_block_factors(ssm.dA, L)) * ssm.dB
    if initial_state is not None:
        state = state + initial_state * dA_powers(ssm.dA, range(L, L + 1))[..., 0].to(ssm.dA.dtype)
    return state
