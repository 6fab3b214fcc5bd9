"""State passing: the diagonal SSM's long convolution over any length, one chunk at a time.

The sequence is cut into chunks of T. With x the complex state at the end of the previous chunk
(x = sum_m dA^(Lprev-1-m) dB u[m], so it already includes dB):

    y_c[l] = (Kd[:T] * u_c)[l] + D u_c[l] + 2 Re(sum_n C_n dA_n^(l+1) x_n)      (l < T)
    x_new  = dA^T x + sum_{l<T} dA^(T-1-l) dB u_c[l]

so every chunk is one causal FFT convolution of size 2T with the same kernel spectrum (computed
once, shared across batch and chunks) and the state terms are small real matrix products.
Under autograd each chunk is checkpointed: backward keeps only the chunk inputs and the (tiny)
carried states, so the convolution's intermediates are bounded by T, not by L.

`state_passing_conv_ref` is the full-length computation (one FFT of size 2L, kernel of length L)
that the chunked one must reproduce exactly.

The helper `mode_powers` is shared with `kernels.h3_core`.
All powers dA^l are formed in float64 from (C, N/2, <=P) factors: float32 exp(l log dA) loses
~l * 6e-8 rad of phase, which at l = 8K is already a 1e-4 relative error in the kernel.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as torch_checkpoint

from hippo.kernels.fftconv import fftconv
from hippo.kernels.ssm import DiscreteDiagonalSSM, diagonal_kernel

__all__ = [
    "state_passing_conv", "state_passing_conv_ref", "diagonal_kernel_blocked", "diagonal_output_from_state",
    "incoming_states",
]

# Inner block of the factored Vandermonde: dA^(a*P + b) = (dA^P)^a * dA^b.
_VANDER_BLOCK = 64


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _complex_of(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def mode_powers(dA: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """dA[..., n] ** e for every e in `exponents`, in complex128: (..., N/2, len(exponents))."""
    z = dA.to(torch.complex128)
    return torch.exp(torch.log(z).unsqueeze(-1) * exponents.to(torch.float64))


def _realify_cols(z: torch.Tensor) -> torch.Tensor:
    """(..., K, N) complex -> (..., K, 2N) real [Re | Im]."""
    return torch.cat((z.real, z.imag), dim=-1)


def diagonal_kernel_blocked(ssm: DiscreteDiagonalSSM, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kd[c, l] = 2 Re(sum_n C dB dA^l) for l < length, as one real batched matmul.

    Same values as `kernels.ssm.diagonal_kernel` but without its (C, N/2, L) complex Vandermonde:
    dA^(aP+b) = (C dB dA^(aP)) dA^b, so the work is a (C, A, N) x (C, N, P) product (A P >= L).
    Returns (channels, length) in `dtype`.
    """
    P = _VANDER_BLOCK
    A = -(-length // P)
    dev = ssm.dA.device
    coef = (ssm.C * ssm.dB).to(torch.complex128).unsqueeze(-1) * mode_powers(
        ssm.dA, torch.arange(A, device=dev) * P
    )  # (C, N/2, A)
    small = mode_powers(ssm.dA, torch.arange(P, device=dev))  # (C, N/2, P)
    # 2 Re(coef * small) = 2 (coef.re small.re - coef.im small.im)
    left = torch.cat((coef.real, -coef.imag), dim=1).transpose(1, 2).to(dtype)  # (C, A, N)
    right = torch.cat((small.real, small.imag), dim=1).to(dtype)  # (C, N, P)
    k = 2 * torch.bmm(left, right)  # (C, A, P)
    return k.reshape(k.shape[0], A * P)[:, :length]


class _ChunkOps:
    """Real matrices that move between a chunk of T inputs/outputs and the N/2 complex modes."""

    def __init__(self, ssm: DiscreteDiagonalSSM, T: int, rdtype: torch.dtype):
        P = min(_VANDER_BLOCK, T)
        assert T % P == 0
        A = T // P
        dev = ssm.dA.device
        self.T, self.P, self.A, self.rdtype = T, P, A, rdtype
        self.cdtype = _complex_of(rdtype)
        n2 = ssm.dA.shape[-1]
        self.n2 = n2
        big = mode_powers(ssm.dA, torch.arange(A, device=dev) * P)  # (C, N/2, A): dA^(aP)
        small = mode_powers(ssm.dA, torch.arange(P + 1, device=dev))  # (C, N/2, P+1): dA^b
        c = ssm.C.to(torch.complex128).unsqueeze(-1)
        b = ssm.dB.to(torch.complex128).unsqueeze(-1)
        # Output from state: y[aP+i] = 2 Re(sum_n (x_n C_n dA^(aP)) dA^(i+1)).
        self.out_big = (c * big).to(self.cdtype)  # (C, N/2, A)
        h = small[..., 1:]  # (C, N/2, P)
        self.out_small = torch.cat((2 * h.real, -2 * h.imag), dim=1).to(rdtype)  # (C, N, P)
        # Input to state: sum_{l<T} dA^(T-1-l) dB u[l], l = aP+j: dA^((A-1-a)P) dA^(P-1-j) dB.
        g = (b * small[..., :P].flip(-1)).transpose(1, 2)  # (C, P, N/2): dB dA^(P-1-j)
        self.in_small = _realify_cols(g).to(rdtype)  # (C, P, N)
        self.in_big = big.flip(-1).to(self.cdtype)  # (C, N/2, A): dA^((A-1-a)P)
        self.decay = mode_powers(ssm.dA, torch.tensor([T], device=dev))[..., 0].to(self.cdtype)  # dA^T

    def state_to_output(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, N/2) complex -> (B, C, T) real: 2 Re(sum_n C_n dA^(l+1) x_n)."""
        Bsz, C, _ = x.shape
        coef = x.transpose(0, 1).unsqueeze(-1) * self.out_big.unsqueeze(1)  # (C, B, N/2, A)
        left = torch.cat((coef.real, coef.imag), dim=2).transpose(2, 3).reshape(C, Bsz * self.A, 2 * self.n2)
        y = torch.bmm(left, self.out_small)  # (C, B*A, P)
        return y.view(C, Bsz, self.T).transpose(0, 1)

    def input_to_state(self, u: torch.Tensor) -> torch.Tensor:
        """u (B, C, T) real -> (B, C, N/2) complex: sum_l dA^(T-1-l) dB u[l]."""
        Bsz, C, _ = u.shape
        s = torch.bmm(u.transpose(0, 1).reshape(C, Bsz * self.A, self.P), self.in_small)  # (C, B*A, N)
        s = torch.complex(s[..., : self.n2], s[..., self.n2 :]).view(C, Bsz, self.A, self.n2)
        x = torch.einsum("cban,cna->bcn", s, self.in_big)
        return x


def state_passing_conv(
    u: torch.Tensor,
    ssm: DiscreteDiagonalSSM,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 4096,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    checkpoint: bool | None = None,
):
    """Diagonal-SSM long convolution of any length in chunks of `chunk_size` (state passing).

    y = causal_conv(u, Kd) + D u (+ the response to `initial_state`), exactly as
    `state_passing_conv_ref`, with FFTs of size 2 * chunk_size only.

    Args:
        u: (B, C, L) real, any L >= 1.
        ssm: discretized diagonal SSM, tensors (C, N/2) complex.
        D: optional (C,) skip.
        chunk_size: T, a multiple of 64 (or any T <= 64); 1K..8K is the useful range.
        initial_state: optional (B, C, N/2) complex state before u[0].
        return_state: also return the (B, C, N/2) complex state after u[L-1].
        checkpoint: recompute each chunk in backward (default: when grad is enabled), so the
            saved tensors are the inputs and the carried states only.
    Returns:
        y (B, C, L) in u's dtype (fp32 compute for half inputs), and the state if asked.
    """
    L = u.shape[-1]
    T = int(chunk_size)
    if T > 64 and T % 64:
        raise ValueError(f"chunk_size must be a multiple of 64 (or <= 64), got {T}")
    rdtype = _real_dtype(u.dtype)
    x_in = u.to(rdtype)
    ops = _ChunkOps(ssm, T, rdtype)
    k_f = torch.fft.rfft(diagonal_kernel_blocked(ssm, T, rdtype), n=2 * T)  # (C, T+1), shared
    Dc = D.to(rdtype) if D is not None else None
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled() and L > T

    def partial_decay(t: int) -> torch.Tensor:
        return mode_powers(ssm.dA, torch.tensor([t], device=u.device))[..., 0].to(ops.cdtype)

    x = initial_state.to(ops.cdtype) if initial_state is not None else None
    outs = []
    for start in range(0, L, T):
        u_c = x_in[..., start : start + T]

        def step(u_c, x, k_f=k_f):
            t = u_c.shape[-1]
            y = torch.fft.irfft(torch.fft.rfft(u_c, n=2 * T) * k_f, n=2 * T)[..., :t]
            if Dc is not None:
                y = y + u_c * Dc.unsqueeze(-1)
            if x is not None:
                y = y + ops.state_to_output(x)[..., :t]
            # Right-align a partial last chunk so its state is at its true end (zeros in front
            # are exact; dividing out extra powers of dA afterwards would not be stable).
            s = ops.input_to_state(torch.nn.functional.pad(u_c, (T - t, 0)) if t < T else u_c)
            if x is not None:
                s = s + x * (ops.decay if t == T else partial_decay(t))
            return y, s

        if checkpoint:
            y, x = torch_checkpoint.checkpoint(step, u_c, x, use_reentrant=False)
        else:
            y, x = step(u_c, x)
        outs.append(y)
    y = torch.cat(outs, dim=-1).to(u.dtype)
    return (y, x) if return_state else y


def state_passing_conv_ref(
    u: torch.Tensor,
    ssm: DiscreteDiagonalSSM,
    D: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
):
    """Full-length reference: one FFT convolution of size 2L with the length-L kernel.

    The initial state's response 2 Re(sum_n C dA^(l+1) x0) and the final state come from the
    plain Vandermonde; memory is O(C * N/2 * L). Same contract as `state_passing_conv`.
    """
    from hippo.kernels.ssm import diagonal_state_from_prefix

    L = u.shape[-1]
    y = fftconv(u, diagonal_kernel(ssm, L), D)
    if initial_state is not None:
        pw = torch.exp(torch.log(ssm.dA).unsqueeze(-1) * torch.arange(1, L + 1, device=u.device).to(ssm.dA.real.dtype))
        y = y + 2 * torch.einsum("bcn,cnl->bcl", initial_state.to(ssm.dA.dtype) * ssm.C, pw).real.to(y.dtype)
    if not return_state:
        return y
    return y, diagonal_state_from_prefix(u, ssm, initial_state)


# ------------------------------------------------------------------ across ranks (context parallel)
# A sequence split into contiguous chunks, one per rank: each chunk runs from a zero state, and
# only the (B, C, N/2) states cross between chunks (`pretrain.models.sequence_split`).


def diagonal_output_from_state(state: torch.Tensor, ssm: DiscreteDiagonalSSM, length: int) -> torch.Tensor:
    """What a state x before position 0 adds to the outputs: 2 Re(sum_n C_n dA_n^(l+1) x_n), l < length.

    Blocked like `diagonal_kernel_blocked` (dA^(aP + b + 1) = dA^(aP) dA^(b+1)): one real batched
    product, no (C, N/2, L) Vandermonde. state: (B, C, N/2) complex. Returns (B, C, length) in
    the real dtype of dA.
    """
    P = min(_VANDER_BLOCK, length)
    A = -(-length // P)
    dev = ssm.dA.device
    rdtype = ssm.dA.real.dtype
    big = mode_powers(ssm.dA, torch.arange(A, device=dev) * P).to(ssm.dA.dtype)  # (C, N/2, A)
    small = mode_powers(ssm.dA, torch.arange(1, P + 1, device=dev)).to(ssm.dA.dtype)  # (C, N/2, P)
    h = (state.to(ssm.dA.dtype) * ssm.C).unsqueeze(-1) * big  # (B, C, N/2, A)
    # 2 Re(h small) = 2 (h.re small.re - h.im small.im): real products over the stacked modes.
    left = torch.cat((h.real, -h.imag), dim=2).transpose(2, 3)  # (B, C, A, N)
    right = torch.cat((small.real, small.imag), dim=1)  # (C, N, P)
    out = 2 * torch.matmul(left, right.to(rdtype))  # (B, C, A, P)
    return out.reshape(*out.shape[:2], A * P)[..., :length]


def incoming_states(final_states: torch.Tensor, dA: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """Exclusive scan over chunks: the true state before each chunk, from every chunk's state
    after it when started from zero (the SSM is linear in its incoming state):

        x_in[0] = 0,  x_in[r] = dA^T x_in[r-1] + final[r-1]   (T = chunk_length)

    final_states: (R, B, C, N/2) complex, one per chunk in sequence order. Returns the same shape.
    """
    decay = mode_powers(dA, torch.tensor([chunk_length], device=dA.device))[..., 0].to(final_states.dtype)  # (C, N/2)
    # Zero, but derived from the inputs: the first chunk's state stays on the autograd path of
    # `final_states` (under context parallelism every rank must run the gather's backward).
    carried = final_states[:0].sum(0)
    states = []
    for final in final_states:
        states.append(carried)
        carried = carried * decay + final
    return torch.stack(states)
