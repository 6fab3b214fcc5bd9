"""State passing over one sequence, chunk by chunk: the algorithm behind the chunked H3 core and
context parallelism, as an oracle, next to the full-length computation it must reproduce.

The sequence is cut into chunks of T. With x the complex state at the end of the previous chunk
(x = sum_m dA^(Lprev-1-m) dB u[m], so it already includes dB):

    y_c[l] = (Kd[:T] * u_c)[l] + D u_c[l] + 2 Re(sum_n C_n dA_n^(l+1) x_n)      (l < T)
    x_new  = dA^T x + sum_{l<T} dA^(T-1-l) dB u_c[l]

so every chunk is one causal FFT convolution of size 2T with the same kernel spectrum and the
state terms are small real matrix products. Under autograd each chunk is checkpointed, so the
convolution's intermediates are bounded by T, not by L (`test_state_passing`'s memory probe).
The package runs the same closed forms in `kernels.h3_core` (chunks of 64, no FFT) and
`kernels.state_passing` (across ranks).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as torch_checkpoint

from hippo.kernels import DiscreteDiagonalSSM, dA_powers, diagonal_kernel, diagonal_state_from_prefix, fftconv

# Inner block of the factored Vandermonde: dA^(a*P + b) = (dA^P)^a * dA^b.
_BLOCK = 64


def _complex_of(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def _realify_cols(z: torch.Tensor) -> torch.Tensor:
    """(..., K, N) complex -> (..., K, 2N) real [Re | Im]."""
    return torch.cat((z.real, z.imag), dim=-1)


class _ChunkOps:
    """Real matrices that move between a chunk of T inputs/outputs and the N/2 complex modes."""

    def __init__(self, ssm: DiscreteDiagonalSSM, T: int, rdtype: torch.dtype):
        P = min(_BLOCK, T)
        assert T % P == 0
        A = T // P
        self.T, self.P, self.A, self.rdtype = T, P, A, rdtype
        self.cdtype = _complex_of(rdtype)
        self.n2 = ssm.dA.shape[-1]
        big = dA_powers(ssm.dA, range(0, T, P))  # (C, N/2, A): dA^(aP)
        small = dA_powers(ssm.dA, range(P + 1))  # (C, N/2, P+1): dA^b
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
        self.decay = dA_powers(ssm.dA, range(T, T + 1))[..., 0].to(self.cdtype)  # dA^T

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
        return torch.einsum("cban,cna->bcn", s, self.in_big)


def chunked_conv_ref(
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

    y = causal_conv(u, Kd) + D u (+ the response to `initial_state`), exactly as `full_conv_ref`,
    with FFTs of size 2 * chunk_size only.

    Args:
        u: (B, C, L) real, any L >= 1.
        ssm: discretized diagonal SSM, tensors (C, N/2) complex.
        D: optional (C,) skip.
        chunk_size: T, a multiple of 64 (or any T <= 64).
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
    rdtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    x_in = u.to(rdtype)
    ops = _ChunkOps(ssm, T, rdtype)
    k_f = torch.fft.rfft(diagonal_kernel(ssm, T).to(rdtype), n=2 * T)  # (C, T+1), shared
    Dc = D.to(rdtype) if D is not None else None
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled() and L > T

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
                decay = ops.decay if t == T else dA_powers(ssm.dA, range(t, t + 1))[..., 0].to(ops.cdtype)
                s = s + x * decay
            return y, s

        if checkpoint:
            y, x = torch_checkpoint.checkpoint(step, u_c, x, use_reentrant=False)
        else:
            y, x = step(u_c, x)
        outs.append(y)
    y = torch.cat(outs, dim=-1).to(u.dtype)
    return (y, x) if return_state else y


def full_conv_ref(
    u: torch.Tensor,
    ssm: DiscreteDiagonalSSM,
    D: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
):
    """Full-length reference: one FFT convolution of size 2L with the length-L kernel.

    The initial state's response 2 Re(sum_n C dA^(l+1) x0) and the final state come from the
    plain Vandermonde; memory is O(C * N/2 * L). Same contract as `chunked_conv_ref`.
    """
    L = u.shape[-1]
    y = fftconv(u, diagonal_kernel(ssm, L), D)
    if initial_state is not None:
        pw = dA_powers(ssm.dA, range(1, L + 1)).to(ssm.dA.dtype)
        y = y + 2 * torch.einsum("bcn,cnl->bcl", initial_state.to(ssm.dA.dtype) * ssm.C, pw).real.to(y.dtype)
    if not return_state:
        return y
    return y, diagonal_state_from_prefix(u, ssm, initial_state)
