"""The H3 core: y = q * DiagSSM(ShiftSSM(k) * v), with explicit dispatch between paths.

    k' = causal_conv(k, Ks) + Dk k        (Ks: the shift SSM's N = 64 taps)
    s  = causal_conv(k' v, Kd) + D k' v   (Kd: the diagonal SSM's kernel, any length)
    y  = q s

Paths (`impl=`):
  "reference"  `h3_core_ref`: two full-length FFT convolutions (`kernels.fftconv`), the oracle.
  "torch"      the fast path on any device: chunked state passing with chunks of P = 64 done as
               real batched matmuls, which this CPU runs ~10x faster than FFTs:
               - the 64-tap shift filter is a banded Toeplitz product per channel (this chunk and
                 the previous one), Dk folded into its diagonal;
               - the diagonal SSM inside a chunk is a P x P Toeplitz product with D folded in;
                 between chunks only the N/2 = 32 complex modes travel (closed form), a short
                 scan over L / P chunk states;
               - all the small matrices (Toeplitz bands, mode maps) are built once per call from
                 the first P taps and shared across the batch: no length-L kernel, no spectrum,
                 no complex intermediate of size L.
               Exact (no FFT rounding); cost O(L (P + 2N)) per channel.
  "triton"     Triton FlashConv (`kernels._flashconv_triton`): the shift SSM as one fused block-FFT
               conv kernel (+ Dk k), then one fused kernel for q * (conv(k' v, Kd) + D k' v).
               CUDA tensors of compute capability >= 8.0 (or CPU under TRITON_INTERPRET=1),
               fp32 / fp16 / bf16, L <= 8192 (fp32: L <= 2048), no initial/returned state;
               otherwise asking for it raises `TritonUnavailableError`.
  "auto"       "triton" where it can run on a CUDA device, else "torch" (`select_impl`, a pure
               function of capability, dtype, length and device type; each choice logged once).

`kernels/` imports only torch (and triton).
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

from hippo.kernels._flashconv_support import flashconv_unsupported
from hippo.kernels.fftconv import fftconv
from hippo.kernels.ssm import DiscreteDiagonalSSM, diagonal_kernel, diagonal_state_from_prefix, shift_kernel
from hippo.kernels.state_passing import mode_powers

__all__ = ["h3_core", "h3_core_ref", "H3_CORE_IMPLS", "TritonUnavailableError", "select_impl", "triton_unsupported"]

log = logging.getLogger(__name__)

H3_CORE_IMPLS = ("auto", "torch", "reference", "triton")
_CHUNK = 64
_auto_logged: set[tuple[str, str]] = set()


class TritonUnavailableError(RuntimeError):
    """impl='triton' was asked for where the Triton path cannot run; `reason` says why.

    A class of its own so that callers (the H3 layer) can name their own option in the message.
    """

    def __init__(self, reason: str):
        super().__init__(f"h3_core(impl='triton'): {reason}; use impl='torch' (chunked fast path) or impl='reference'")
        self.reason = reason


def triton_unsupported(
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    length: int,
    device_type: str,
    *,
    stateful: bool = False,
    interpret: bool = False,
    triton_installed: bool = True,
) -> str | None:
    """None if the Triton path can run these inputs, else why not.

    Pure: the machine's facts (capability of a CUDA device, TRITON_INTERPRET, triton installed)
    are arguments, so every branch is testable without a GPU.
    """
    if not triton_installed:
        return "triton is not installed"
    if device_type != "cuda" and not interpret:
        return f"tensors are on {device_type}, not CUDA (set TRITON_INTERPRET=1 to interpret the kernel on CPU)"
    if stateful:
        return "initial_state / return_state are not supported by the Triton FlashConv path"
    if device_type == "cuda" and capability is None:
        return "the CUDA device's compute capability is unknown"
    return flashconv_unsupported(capability if device_type == "cuda" else None, dtype, length)


def select_impl(
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    length: int,
    device_type: str,
    *,
    impl: str = "auto",
    stateful: bool = False,
    interpret: bool = False,
    triton_installed: bool = True,
) -> str:
    """The path `h3_core` runs: "auto" never picks a path that raises (Triton on CUDA where it
    has a clean configuration, else the chunked "torch" path; the interpreter is for tests and
    never picked). An explicit "triton" that cannot run raises `TritonUnavailableError`.

    capability: (major, minor) of the CUDA device, None elsewhere; dtype: the kernels' operand
    dtype (k's); length: L. Pure, like `triton_unsupported`.
    """
    if impl not in H3_CORE_IMPLS:
        raise ValueError(f"impl must be one of {H3_CORE_IMPLS}, got {impl!r}")
    if impl == "auto":
        why = triton_unsupported(capability, dtype, length, device_type, stateful=stateful,
                                 triton_installed=triton_installed)
        return "triton" if why is None else "torch"
    if impl == "triton":
        why = triton_unsupported(capability, dtype, length, device_type, stateful=stateful, interpret=interpret,
                                 triton_installed=triton_installed)
        if why is not None:
            raise TritonUnavailableError(why)
    return impl


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, length: int, stateful: bool) -> str:
    """`select_impl` with this machine's facts; logs each (device type, choice) of "auto" once."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    facts = dict(stateful=stateful, interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
                 triton_installed=importlib.util.find_spec("triton") is not None)
    chosen = select_impl(capability, dtype, length, device.type, impl=impl, **facts)
    if impl == "auto" and (device.type, chosen) not in _auto_logged:
        _auto_logged.add((device.type, chosen))
        why = triton_unsupported(capability, dtype, length, device.type, **{**facts, "interpret": False})
        log.info("h3_core impl='auto' picked %r on %s%s", chosen, device.type, f" ({why})" if why else "")
    return chosen


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ small per-call matrices
def _lag_toeplitz(taps: torch.Tensor, P: int, blocks: int) -> list[torch.Tensor]:
    """Causal Toeplitz blocks of a filter for chunks of P: out_chunk += in_chunk_{-m} @ T_m.

    T_m[j, i] = taps[i + m P - j] (zero for negative lags or lags past the taps), m < blocks.
    Built as flipped windows of one padded row (views plus a flip), not with index gathers.
    """
    C, N = taps.shape
    g = F.pad(taps, (P - 1, blocks * P - N))  # g[P-1+lag] = taps[lag], lag in [-(P-1), blocks*P)
    windows = g.unfold(-1, P, 1)  # (C, blocks*P, P): windows[s, t] = g[s + t]
    # T_m[j, i] = g[P-1 + mP + i - j] = windows[mP + P-1-j, i]
    return [windows[:, m * P : (m + 1) * P].flip(1) for m in range(blocks)]


def _shift_taps(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Ks[c, l] = sum_n B[c, n] C[c, n + l] for l < N (same as `shift_kernel(B, C, N)`)."""
    N = B.shape[-1]
    windows = F.pad(C, (0, N - 1)).unfold(-1, N, 1)  # (C, l, n) = C[c, l + n]
    return (windows * B.unsqueeze(1)).sum(-1)


def _consecutive_powers(dA: torch.Tensor, n: int) -> torch.Tensor:
    """dA^0 .. dA^(n-1) in complex128 by a running product: (C, N/2, n).

    Several times cheaper than exp(l log dA) for the short ranges used per call, and in float64
    the accumulated rounding over n <= 65 factors stays ~1e-14.
    """
    z = dA.to(torch.complex128).unsqueeze(-1).expand(*dA.shape, n - 1)
    return torch.cumprod(torch.cat((torch.ones_like(z[..., :1]), z), dim=-1), dim=-1)


class _DiagChunkMats:
    """Everything the chunked diagonal SSM needs for chunks of P, built in float64 then cast.

    Mode maps keep (n, re/im) interleaved so that complex views of their products need no copy.
    """

    def __init__(self, ssm: DiscreteDiagonalSSM, D: torch.Tensor, P: int, rdtype: torch.dtype):
        n2 = ssm.dA.shape[-1]
        C = ssm.dA.shape[0]
        pw = _consecutive_powers(ssm.dA, P + 1)  # (C, N/2, P+1) complex128: dA^0..dA^P
        cb = (ssm.C * ssm.dB).to(torch.complex128)
        kd = 2 * torch.bmm(cb.unsqueeze(1), pw[..., :P]).squeeze(1).real  # (C, P): first P taps of Kd
        kd = torch.cat((kd[:, :1] + D.to(torch.float64).unsqueeze(-1), kd[:, 1:]), dim=1)  # D at lag 0
        self.toep = _lag_toeplitz(kd.to(rdtype), P, 1)[0]  # (C, P, P)
        # Chunk end-state from inputs: sum_j dA^(P-1-j) dB u[j] -> (C, P, N/2 * 2).
        g = (ssm.dB.to(torch.complex128).unsqueeze(-1) * pw[..., :P].flip(-1)).transpose(1, 2)
        self.to_state = torch.view_as_real(g).reshape(C, P, 2 * n2).to(rdtype)
        # Output from the state before a chunk: 2 Re(C dA^(i+1) x) = x.re 2h.re - x.im 2h.im.
        h = ssm.C.to(torch.complex128).unsqueeze(-1) * pw[..., 1:]  # (C, N/2, P)
        self.from_state = torch.stack((2 * h.real, -2 * h.imag), dim=2).reshape(C, 2 * n2, P).to(rdtype)
        cdtype = torch.complex128 if rdtype == torch.float64 else torch.complex64
        self.decay = pw[..., P].to(cdtype)  # (C, N/2): dA^P
        self.n2, self.cdtype = n2, cdtype


class _ChunkScan(torch.autograd.Function):
    """x_a = w x_{a-1} + e_a over chunks a = 0..A-1, returning every state *before* a chunk.

    A hand-written backward: autograd through A small per-chunk ops costs O(A^2) here (each
    `select` backward materializes a full-size zero gradient); the reverse scan is the same
    recurrence with conj(w) (PyTorch's complex-gradient convention).
    Shapes: ends (C, B, A, N/2) complex, w (C, N/2) complex, x0 (C, B, N/2) complex.
    """

    @staticmethod
    def forward(ctx, ends, w, x0):
        before = torch.empty_like(ends)
        x = x0.clone()
        wb = w.unsqueeze(1)
        for a in range(ends.shape[2]):
            before[:, :, a] = x
            x = torch.addcmul(ends[:, :, a], wb, x)
        ctx.save_for_backward(before, w)
        return before, x

    @staticmethod
    def backward(ctx, grad_before, grad_final):
        before, w = ctx.saved_tensors
        wc = w.conj().unsqueeze(1)
        grad_ends = torch.empty_like(before)
        g = grad_final.clone()
        for a in range(before.shape[2] - 1, -1, -1):
            grad_ends[:, :, a] = g  # gradient w.r.t. x_a
            g = torch.addcmul(grad_before[:, :, a], wc, g)  # ... w.r.t. x_{a-1} = before[a]
        grad_w = (grad_ends * before.conj()).sum((1, 2))
        return grad_ends, grad_w, g


def _to_chunks(x: torch.Tensor, Lp: int, rdtype: torch.dtype) -> torch.Tensor:
    """(B, C, L) any strides -> (C, B, Lp) contiguous in rdtype, zero-padded at the end."""
    x = x.to(rdtype)
    Bsz, C, L = x.shape
    if x.stride() == (L * C, 1, C):
        # A transposed (B, L, C) projection output: one 2-D transpose of (B L, C), which runs
        # ~2x faster on CPU than the general 3-D permuted copy.
        x = x.transpose(1, 2).reshape(Bsz * L, C).t().contiguous().view(C, Bsz, L)
    else:
        x = x.transpose(0, 1).contiguous()
    if Lp != L:
        x = F.pad(x, (0, Lp - L))
    return x


def _h3_core_chunked(q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state, return_state, P=_CHUNK):
    Bsz, C, L = q.shape
    N = shift_B.shape[-1]
    if N > P:
        raise ValueError(f"shift SSM with {N} taps needs chunks of at least {N}, got {P}")
    rdtype = _real_dtype(q.dtype)
    A = -(-L // P)
    Lp = A * P
    qc, kc, vc = (_to_chunks(t, Lp, rdtype) for t in (q, k, v))  # (C, B, Lp)

    # Shift SSM: k' = k @ T0 (this chunk) + k_prev @ T1 (previous chunk's tail), Dk at lag 0.
    taps = _shift_taps(shift_B.to(rdtype), shift_C.to(rdtype))  # (C, N)
    taps = torch.cat((taps[:, :1] + shift_D.to(rdtype).unsqueeze(-1), taps[:, 1:]), dim=1)
    T0, T1 = _lag_toeplitz(taps, P, 2)
    k3 = kc.view(C, Bsz * A, P)
    kp = torch.bmm(k3, T0).view(C, Bsz, A, P)
    if A > 1:
        carry = torch.bmm(k3, T1).view(C, Bsz, A, P)
        kp[:, :, 1:] += carry[:, :, :-1]  # in place on a bmm output: autograd-safe
    kv = kp.view(C, Bsz, Lp) * vc  # padded tail: k' may be nonzero there, but v is zero

    # Diagonal SSM: intra-chunk Toeplitz, chunk end-states, scan, response to carried states.
    m = _DiagChunkMats(ssm, D, P, rdtype)
    kv3 = kv.view(C, Bsz * A, P)
    s = torch.bmm(kv3, m.toep).view(C, Bsz, A, P)
    ends = torch.view_as_complex(torch.bmm(kv3, m.to_state).view(C, Bsz, A, m.n2, 2))  # (C, B, A, N/2)
    if initial_state is not None:
        x0 = initial_state.to(m.cdtype).transpose(0, 1).contiguous()
    else:
        x0 = ends.new_zeros(C, Bsz, m.n2)
    before, x = _ChunkScan.apply(ends, m.decay, x0)  # before[:, :, a]: state before chunk a
    if A > 1 or initial_state is not None:
        resp = torch.bmm(torch.view_as_real(before).view(C, Bsz * A, 2 * m.n2), m.from_state)
        s = s + resp.view(C, Bsz, A, P)
    y = (qc * s.view(C, Bsz, Lp))[..., :L].transpose(0, 1).to(q.dtype)  # (B, C, L) view
    if not return_state:
        return y
    # State after position L-1: exact when L fills the chunks; otherwise close the last partial
    # chunk from the state before it (dividing out padded steps would not be stable).
    if Lp == L:
        state = x.transpose(0, 1)
    else:
        r = L - (A - 1) * P
        init = before[:, :, A - 1].transpose(0, 1)
        tail = kv[..., (A - 1) * P : (A - 1) * P + r].transpose(0, 1)
        pw = mode_powers(ssm.dA, torch.arange(r + 1, device=q.device))  # (C, N/2, r+1)
        g = (ssm.dB.to(torch.complex128).unsqueeze(-1) * pw[..., :r].flip(-1)).to(m.cdtype)
        state = torch.einsum("bcl,cnl->bcn", tail.to(m.cdtype), g) + init * pw[..., r].to(m.cdtype)
    return y, state


def h3_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shift_B: torch.Tensor,
    shift_C: torch.Tensor,
    shift_D: torch.Tensor,
    ssm: DiscreteDiagonalSSM,
    D: torch.Tensor,
    *,
    impl: str = "auto",
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
):
    """y = q * (causal_conv(k' v, Kd) + D k' v), k' = causal_conv(k, Ks) + Dk k.

    Args:
        q, k, v: (B, C, L), any strides (a transposed (B, L, C) projection is fine).
        shift_B, shift_C: (C, N) shift-SSM parameters (N <= 64); shift_D: (C,).
        ssm: discretized diagonal SSM, (C, N/2) complex tensors; D: (C,).
        impl: "auto" | "torch" | "reference" | "triton" (see module docstring and `select_impl`).
        initial_state: optional (B, C, N/2) complex diagonal-SSM state before position 0.
        return_state: also return the (B, C, N/2) complex diagonal-SSM state after L-1
            (the prefill state for generation).
    Returns:
        y (B, C, L) in q's dtype (computed in fp32, or fp64 for fp64 inputs)[, state].
    """
    impl = _resolve_impl(impl, q.device, k.dtype, q.shape[-1], initial_state is not None or return_state)
    if impl == "triton":
        return _h3_core_triton(q, k, v, shift_B, shift_C, shift_D, ssm, D)
    if impl == "reference":
        return h3_core_ref(
            q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state=initial_state, return_state=return_state
        )
    return _h3_core_chunked(q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state, return_state)


def _h3_core_triton(q, k, v, shift_B, shift_C, shift_D, ssm, D):
    """Two fused FlashConv launches; the kernels are torch ops, so SSM parameters get gradients."""
    from hippo.kernels._flashconv_triton import flashconv  # triton is optional: import on use

    L = q.shape[-1]
    N = shift_B.shape[-1]
    kp = flashconv(k, shift_kernel(shift_B, shift_C, min(L, N)), shift_D)  # (B, C, L): k'
    return flashconv(kp, diagonal_kernel(ssm, L), D, v=v, q=q)


def h3_core_ref(
    q, k, v, shift_B, shift_C, shift_D, ssm, D, *, initial_state=None, return_state=False
):
    """The reference path: full-length FFT convolutions with the materialized kernels."""
    L = q.shape[-1]
    N = shift_B.shape[-1]
    kp = fftconv(k, shift_kernel(shift_B, shift_C, min(L, N)), shift_D)
    kv = kp * v
    s = fftconv(kv, diagonal_kernel(ssm, L), D)
    if initial_state is not None:
        pw = torch.exp(torch.log(ssm.dA).unsqueeze(-1) * torch.arange(1, L + 1, device=q.device).to(ssm.dA.real.dtype))
        s = s + 2 * torch.einsum("bcn,cnl->bcl", initial_state.to(ssm.dA.dtype) * ssm.C, pw).real.to(s.dtype)
    y = q * s
    if not return_state:
        return y
    return y, diagonal_state_from_prefix(kv, ssm, initial_state)
