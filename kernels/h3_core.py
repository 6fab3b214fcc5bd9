"""The H3 core: y = q * DiagSSM(ShiftSSM(k) * v), with explicit dispatch between paths.

    k' = causal_conv(k, Ks) + Dk k        (Ks: the shift SSM's N = 64 taps)
    s  = causal_conv(k' v, Kd) + D k' v   (Kd: the diagonal SSM's kernel, any length)
    y  = q s

Paths (`impl=`):
  "reference"  `h3_core_ref`: two full-length FFT convolutions (`kernels.fftconv`), the oracle.
  "torch"      the fast path on any device: chunked state passing with chunks of P = 64 done as
               real batched matmuls, which this CPU runs ~10x faster than FFTs, over blocks of
               bounded size (C x B x T <= 2^20 elements, `block_length`), so that every
               intermediate stays in the last-level cache and no allocation grows with L:
               - the 64-tap shift filter is a banded Toeplitz product per channel (this chunk and
                 the previous one), Dk folded into its diagonal; its state crosses a block
                 boundary as the halo, the P inputs before the block;
               - the diagonal SSM inside a chunk is a P x P Toeplitz product with D folded in;
                 between chunks, and between blocks, only the N/2 = 32 complex modes travel
                 (closed form), a short scan over the chunk states;
               - all the small matrices (Toeplitz bands, mode maps) are built once per call from
                 the first P taps and shared across the batch (`_ShiftMats`, `_DiagMats`, with
                 closed-form backwards): no length-L kernel, no spectrum;
               - one autograd Function (`_BlockedH3`) runs the blocks forward and walks them in
                 reverse in backward, carrying both states' gradients back across the blocks.
               Exact (no FFT rounding); cost O(L (P + 2N)) per channel, time per token flat in L.
               Packed documents (doc_start): exact isolation from closed forms, see
               `kernels.documents` (masks across chunks, and per start inside a chunk one more
               row in each SSM's in-chunk product).
  "triton"     Triton FlashConv (`kernels._flashconv_triton`): the shift SSM as one fused block-FFT
               conv kernel (+ Dk k), then one fused kernel for q * (conv(k' v, Kd) + D k' v).
               CUDA tensors of compute capability >= 8.0 (or CPU under TRITON_INTERPRET=1),
               fp32 / fp16 / bf16, L <= 8192 (fp32: L <= 2048), no initial/returned state, no
               doc_start; otherwise asking for it raises `TritonUnavailableError`.
  "auto"       "triton" where it can run on a CUDA device, else "torch" (`select_impl`, a pure
               function of capability, dtype, length and device type; each choice logged once).

`kernels/` imports only torch (and triton).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

from hippo.kernels import ops as _ops
from hippo.kernels._flashconv_support import flashconv_unsupported
from hippo.kernels.documents import check_doc_start, document_spans, shared_plan
from hippo.kernels.fftconv import fftconv
from hippo.kernels.ssm import DiscreteDiagonalSSM, dA_powers, diagonal_kernel, diagonal_state_from_prefix, shift_kernel

__all__ = [
    "diagonal_conv", "h3_core", "h3_core_ref", "H3_CORE_IMPLS", "TritonUnavailableError", "select_impl",
    "triton_unsupported",
]

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
    documents: bool = False,
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
    if documents:
        return "per-document isolation (doc_start) is not supported by the Triton FlashConv path"
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
    documents: bool = False,
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
                                 triton_installed=triton_installed, documents=documents)
        return "triton" if why is None else "torch"
    if impl == "triton":
        why = triton_unsupported(capability, dtype, length, device_type, stateful=stateful, interpret=interpret,
                                 triton_installed=triton_installed, documents=documents)
        if why is not None:
            raise TritonUnavailableError(why)
    return impl


def _resolve_impl(
    impl: str, device: torch.device, dtype: torch.dtype, length: int, stateful: bool, documents: bool = False
) -> str:
    """`select_impl` with this machine's facts; logs each (device type, choice) of "auto" once,
    and once more the first time documents are what sends it off Triton."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    facts = dict(stateful=stateful, interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
                 triton_installed=importlib.util.find_spec("triton") is not None, documents=documents)
    chosen = select_impl(capability, dtype, length, device.type, impl=impl, **facts)
    why = None
    if impl == "auto":
        why = triton_unsupported(capability, dtype, length, device.type, **{**facts, "interpret": False})
    key = (device.type, chosen, bool(why) and "doc_start" in why)
    # Not while dynamo traces (a compiled block): a log call there is a graph break.
    if impl == "auto" and not torch.compiler.is_compiling() and key not in _auto_logged:
        _auto_logged.add(key)
        log.info("h3_core impl='auto' picked %r on %s%s", chosen, device.type, f" ({why})" if why else "")
    return chosen


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(fn):
    """Run fn with autocast off on its tensors' device: the chunked path computes in fp32 (fp64 for
    fp64 inputs) whatever the caller's autocast, as documented, and its in-place batched matmuls
    need operands of one dtype. Also wraps the hand-written backwards (autograd does not carry
    the forward's autocast state into them)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------ small per-call matrices
# Built without autograd and differentiated by hand. Through autograd, the complex128 powers
# (cumprod backward), the Toeplitz windows (unfold/flip backward) and the concatenations made a
# fixed cost per call: at C = 256, B 4 x L 64 the whole core took 54 ms of CPU (fwd+bwd, one
# thread), now 31 ms.
def _lag_toeplitz(taps: torch.Tensor, P: int, blocks: int) -> torch.Tensor:
    """Causal banded Toeplitz [T_0 | T_1 | ...] of a filter for chunks of P: (C, P, blocks * P).

    W[j, i] = taps[i - j] (zero for negative lags or lags past the taps), so that
    out_chunk = sum_m in_chunk_{-m} @ W[:, m P : (m + 1) P]. Flipped windows of one padded row.
    """
    C, N = taps.shape
    g = F.pad(taps, (P - 1, blocks * P - N))  # g[P-1+lag] = taps[lag], lag in [-(P-1), blocks*P)
    windows = g.unfold(-1, blocks * P, 1)  # (C, P, blocks*P): windows[s, t] = g[s + t]
    return windows.flip(1)  # W[j, i] = g[P-1 + i - j] = windows[P-1-j, i]


def _diagonal_sums(G: torch.Tensor, lags: int) -> torch.Tensor:
    """sum_j G[:, j, j + l] for l < lags, G (C, P, M), entries past column M counting as zero."""
    C, P, M = G.shape
    if M < P - 1 + lags:
        G = F.pad(G, (0, P - 1 + lags - M))
    G = G.contiguous()
    M = G.shape[-1]
    return G.as_strided((C, lags, P), (P * M, 1, M + 1)).sum(-1)


class _ShiftMats(torch.autograd.Function):
    """The shift SSM's banded Toeplitz [S0 | S1] (C, P, 2P) for chunks of P from (B, C, D).

    taps[l] = sum_n B[n] C[n + l] + D [l = 0] (l < N <= P) and W[j, i] = taps[i - j], so that a
    chunk's k' = k_chunk @ S0 + k_previous_chunk @ S1. Backward: the matrix gradient's diagonal
    sums are the taps' gradient, then two small depthwise correlations give B's and C's.
    """

    @staticmethod
    def forward(ctx, sB, sC, sD, P):
        C, N = sB.shape
        taps = F.conv1d(F.pad(sC, (0, N - 1)).unsqueeze(0), sB.unsqueeze(1), groups=C)[0]  # (C, N)
        taps[:, 0] += sD
        ctx.save_for_backward(sB, sC)
        return _lag_toeplitz(taps, P, 2)

    @staticmethod
    @_no_autocast
    def backward(ctx, gW):
        sB, sC = ctx.saved_tensors
        C, N = sB.shape
        g_taps = _diagonal_sums(gW, N)  # (C, N)
        g_B = F.conv1d(F.pad(sC, (0, N - 1)).unsqueeze(0), g_taps.unsqueeze(1), groups=C)[0]
        g_C = F.conv1d(F.pad(sB, (N - 1, 0)).unsqueeze(0), g_taps.flip(-1).unsqueeze(1), groups=C)[0]
        return g_B, g_C, g_taps[:, 0].clone(), None


class _DiagMats(torch.autograd.Function):
    """Everything the chunked diagonal SSM needs for chunks of P, from (dA, dB, C, D).

    Returns, in the real dtype `rdtype` (powers formed in complex128, products in `cdtype`):
      toep      (C, P, P): Toeplitz[j, i] = Kd[i - j], D at lag 0 (the chunk's own inputs);
      to_state  (C, P, N): rows j, columns (n, re/im) of dB dA^(P-1-j) (a chunk's end state);
      from      (C, N, P), a transposed view: rows (n, re/im) = (2 Re h, -2 Im h), h = C dA^(i+1)
                (output from the state before a chunk: 2 Re(h x) = x.re 2 h.re - x.im 2 h.im);
      decay     (C, N/2) complex: dA^P.
    Mode maps keep (n, re/im) interleaved so that complex views of their products need no copy.
    Backward contracts the gradients with the powers in closed form (PyTorch's complex
    convention: for w = f(z), grad_z = grad_w conj(f'(z))).
    """

    @staticmethod
    def forward(ctx, dA, dB, Cm, D, P, rdtype):
        C, n2 = dA.shape
        cdtype = torch.complex128 if rdtype == torch.float64 else torch.complex64
        pw = dA_powers(dA, range(P + 1)).transpose(1, 2)  # (C, P+1, N/2)
        cb = dB.to(torch.complex128) * Cm.to(torch.complex128)
        coef = torch.view_as_real(2 * cb.conj()).reshape(C, 2 * n2, 1)  # (2 Re cb, -2 Im cb)
        kd = torch.bmm(torch.view_as_real(pw[:, :P]).reshape(C, P, 2 * n2), coef).squeeze(-1)  # 2 Re(cb dA^l)
        kd[:, 0] += D.to(torch.float64)
        toep = _lag_toeplitz(kd.to(rdtype), P, 1)
        pwc = pw.to(cdtype)
        cpw = pwc.conj_physical()
        b, gm = dB.to(cdtype), Cm.to(cdtype)
        to_state = torch.view_as_real(b.unsqueeze(1) * pwc[:, :P].flip(1)).reshape(C, P, 2 * n2)
        from_t = torch.view_as_real((2 * gm.conj()).unsqueeze(1) * cpw[:, 1:]).reshape(C, P, 2 * n2)
        ctx.save_for_backward(pwc, cpw, b, gm)
        ctx.dtypes = (dA.dtype, dB.dtype, Cm.dtype, D.dtype)
        return toep, to_state.to(rdtype), from_t.to(rdtype).transpose(1, 2), pwc[:, P].clone()

    @staticmethod
    @_no_autocast
    def backward(ctx, g_toep, g_to, g_from, g_decay):
        pwc, cpw, b, gm = ctx.saved_tensors
        C, P1, n2 = pwc.shape
        P = P1 - 1
        pr = torch.view_as_real(pwc).reshape(C, P1, 2 * n2)  # (Re, Im) of dA^l
        steps = torch.arange(P, dtype=pr.dtype, device=pr.device)
        # Toeplitz: Kd[l] = 2 Re(cb dA^l) + D [l = 0] -> sums over l with conj(dA^l) as GEMVs.
        g_kd = _diagonal_sums(g_toep, P).to(pr.dtype)  # (C, P)
        s0 = torch.bmm(g_kd.unsqueeze(1), pr[:, :P]).view(C, n2, 2)
        s1 = torch.bmm((g_kd * steps)[:, 1:].unsqueeze(1), pr[:, : P - 1]).view(C, n2, 2)
        g_cb = 2 * torch.complex(s0[..., 0], -s0[..., 1])  # 2 sum_l g_kd[l] conj(dA^l)
        dA_kd = torch.complex(s1[..., 0], -s1[..., 1])  # sum_l l g_kd[l] conj(dA^(l-1))
        # to_state[j] = dB dA^(P-1-j).
        G_t = torch.view_as_complex(g_to.to(pr.dtype).contiguous().view(C, P, n2, 2)).flip(1)  # by power P-1-j
        g_b = (G_t * cpw[:, :P]).sum(1) + g_cb * gm.conj()
        dA_t = (G_t[:, 1:] * (cpw[:, : P - 1] * steps[1:].unsqueeze(-1))).sum(1)  # sum_l l G_t[l] conj(dA^(l-1))
        # from rows (2 Re h, -2 Im h) = re/im of 2 conj(h), h_i = C dA^(i+1): grad h = 2 conj(G_f).
        G_f = torch.view_as_complex(g_from.transpose(1, 2).to(pr.dtype).contiguous().view(C, P, n2, 2))
        g_gm = 2 * (G_f * pwc[:, 1:]).sum(1).conj() + g_cb * b.conj()
        dA_h = 2 * (gm * (G_f * (pwc[:, :P] * (steps + 1).unsqueeze(-1))).sum(1)).conj()
        g_dA = 2 * (gm * b).conj() * dA_kd + b.conj() * dA_t + dA_h + P * g_decay * cpw[:, P - 1]
        tA, tB, tC, tD = ctx.dtypes
        return g_dA.to(tA), g_b.to(tB), g_gm.to(tC), g_kd[:, 0].to(tD), None, None


# ------------------------------------------------------------------ blocks of bounded size
# Every intermediate of the chunked path is one (C, B, T) block tensor or smaller: at most
# _BLOCK_ELEMS elements (4 MiB in fp32). glibc serves each allocation above 32 MiB with a fresh
# mmap, so (C, B, L)-sized intermediates were page-faulted in and zeroed by the kernel on every
# call once C x B x L passed 8M elements (2.8 GB of page faults per fwd+bwd at 256 x 4 x 16K);
# block tensors are reused from the heap and stay in the last-level cache.
_BLOCK_ELEMS = 1 << 20
_MIN_BLOCK = 256


def block_length(channels: int, batch: int, length: int, P: int = _CHUNK) -> int:
    """T of the blocks `h3_core(impl="torch")` runs: a multiple of P with C x B x T <= 2^20
    (but at least `_MIN_BLOCK`), at most L rounded up to P."""
    t = max(_MIN_BLOCK, (_BLOCK_ELEMS // max(1, channels * batch)) // P * P)
    return min(t, -(-length // P) * P)


def _spans(L: int, T: int, P: int) -> list[tuple[int, int, int]]:
    """(start, valid length tb, padded length tp = ceil(tb / P) P) of each block."""
    return [(t0, min(T, L - t0), -(-min(T, L - t0) // P) * P) for t0 in range(0, L, T)]


def _channels_last(x: torch.Tensor) -> bool:
    """(B, C, L) stored as (B, L, C): the layer's transposed projections."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _like_layout(x: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty (B, C, t) tensor stored like x (channels-last or not)."""
    Bsz, C = x.shape[:2]
    if _channels_last(x):
        return torch.empty(Bsz, t, C, dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty(Bsz, C, t, dtype=dtype, device=x.device)


def _stage(buf: torch.Tensor, Bsz: int, C: int, tp: int) -> torch.Tensor:
    """A contiguous (B, C, tp) view at the start of the flat staging buffer."""
    return buf[: Bsz * C * tp].view(Bsz, C, tp)


def _load(dst: torch.Tensor, x: torch.Tensor, t0: int, tb: int, buf: torch.Tensor) -> None:
    """dst (C, ab, B, P) chunk-major block <- positions t0 .. t0 + tb of x (B, C, L), zero beyond.

    Per sample into a contiguous (C, tp) staging row: for a channels-last x one blocked 2-D
    transpose (`Tensor.copy_`'s fast path, ~2x faster than one 3-D permuted copy but on one
    core), then whole chunks of P into place for all samples at once.
    """
    C, ab, Bsz, P = dst.shape
    tp = ab * P
    st = _stage(buf, Bsz, C, tp)
    for b in range(Bsz):
        if tb == tp:
            st[b].copy_(x[b, :, t0 : t0 + tb])
        else:
            st[b, :, :tb].copy_(x[b, :, t0 : t0 + tb])
            st[b, :, tb:].zero_()
    dst.copy_(st.view(Bsz, C, ab, P).permute(1, 2, 0, 3))


def _store(dst: torch.Tensor, src: torch.Tensor, tb: int, buf: torch.Tensor) -> None:
    """dst (B, C, tb) <- the first tb positions of a chunk-major block src (C, ab, B, P)."""
    C, ab, Bsz, P = src.shape
    st = _stage(buf, Bsz, C, ab * P)
    st.view(Bsz, C, ab, P).copy_(src.permute(2, 0, 1, 3))
    if _channels_last(dst):
        for b in range(Bsz):
            dst[b].t().copy_(st[b, :, :tb].t())  # the blocked 2-D transpose
    else:
        dst.copy_(st[..., :tb])


def _blocked_forward(q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, save, plan=None, keep_ext=False):
    """The chunked H3 core over blocks of T positions, carrying both SSM states between blocks.

    Blocks are chunk-major, (C, ab, B, P): row a B + b of a channel's matrices is chunk a of
    sample b, so "the previous chunk" of every row is a contiguous range of rows. Per block:
      shift SSM:    k' = k_chunk @ S0 + k_prev_chunk @ S1, where the chunk before the block's first
                    is the halo: the P inputs before the block, which hold the shift SSM's state
                    (its last N-1 inputs);
      diagonal SSM: s = (k' v) @ Toeplitz, ends = (k' v) @ to_state, the scan x <- dA^P x + end
                    over the block's chunks (x enters from the previous block), s += before @ from;
      y = q s, in q's layout.
    Returns y, the state before the last chunk (C, B, N/2), k'v of the last chunk (C, B, P), and
    (when `save`) per block what backward needs: the k block with its halo, k', v, s, the states.
    With documents and `keep_ext` (the eager Function, whose saved tensors no fake implementation
    has to predict), a block saves its k and k'v buffers with their pair rows as filled here, so
    backward neither copies nor refills them: (kext, k', v, s, states, kvx).

    Documents (`plan`, a `kernels.documents.ChunkPlan`): across chunks by masks (the shift SSM's
    S1 reads the previous chunk from its last start on and writes this one's outputs before its
    first start; the incoming state's response stops at the first start, the end state comes from
    the last start on, the carry stops); inside a chunk the S0 and Toeplitz products that cross a
    start are subtracted, with half of the product's matrix per start (`_cross_starts`).
    None: today's ops, untouched.
    """
    Bsz, C, L = q.shape
    P = w_shift.shape[1]
    n2 = decay.shape[-1]
    rdtype, cdtype, dev = w_shift.dtype, decay.dtype, q.device
    S0, S1 = w_shift[..., :P], w_shift[..., P:]
    y = _like_layout(q, L, q.dtype)
    x = x0 if x0 is not None else torch.zeros(C, Bsz, n2, dtype=cdtype, device=dev)
    wb = decay.unsqueeze(1)
    buf = torch.empty(Bsz * C * min(T, -(-L // P) * P), dtype=rdtype, device=dev)  # staging for transposes
    halo = None
    saved = []
    for i, (t0, tb, tp) in enumerate(_spans(L, T, P)):
        ab = tp // P
        bp = plan.blocks[i] if plan is not None else None
        R = ab * Bsz
        if bp is None:
            kbuf = torch.empty(C, ab + 1, Bsz, P, dtype=rdtype, device=dev)
        else:  # the block's rows (halo chunk first), then one row per pair correction (`_cross_starts`)
            kext = torch.empty(C, R + Bsz + bp.pair_rows.numel(), P, dtype=rdtype, device=dev)
            kbuf = kext[:, : R + Bsz].view(C, ab + 1, Bsz, P)
        if halo is None:
            kbuf[:, 0].zero_()
        else:
            kbuf[:, 0].copy_(halo)
        _load(kbuf[:, 1:], k, t0, tb, buf)
        rows = (C, ab * Bsz, P)
        if bp is None:
            kp = torch.bmm(kbuf[:, 1:].reshape(rows), S0).baddbmm_(kbuf[:, :-1].reshape(rows), S1)
        else:
            kp = _shift_starts(kext, Bsz, S0, S1, bp)
        vb = torch.empty(C, ab, Bsz, P, dtype=rdtype, device=dev)
        _load(vb, v, t0, tb, buf)
        if bp is None:
            kv = kp * vb.view(rows)  # zero beyond tb
        else:
            kvx = torch.empty(C, R + bp.pair_rows.numel(), P, dtype=rdtype, device=dev)
            kv = torch.mul(kp, vb.view(rows), out=kvx[:, :R])
        # A chunk's end state: only from its last start on.
        ends = torch.view_as_complex(torch.bmm(kv if bp is None else kv * bp.tail, to_state).view(C, ab, Bsz, n2, 2))
        before = torch.empty(C, ab, Bsz, n2, dtype=cdtype, device=dev)
        before[:, 0] = x
        wk = None if bp is None else wb.unsqueeze(1) * bp.keep  # (C, ab, B, N/2): no carry out of a start's chunk
        for a in range(ab - 1):
            torch.addcmul(ends[:, a], wb if wk is None else wk[:, a], before[:, a], out=before[:, a + 1])
        x = torch.addcmul(ends[:, ab - 1], wb if wk is None else wk[:, ab - 1], before[:, ab - 1])
        before_r = torch.view_as_real(before).view(C, ab * Bsz, 2 * n2)
        if bp is None:
            s = torch.bmm(kv, toep).baddbmm_(before_r, from_state)
        else:  # the incoming state stops at the chunk's first start
            s = _cross_starts(kvx, toep, bp).addcmul_(torch.bmm(before_r, from_state), bp.head)
        s_q = _like_layout(q, tb, rdtype)  # s in q's layout, for y = q s here and g_q = g_y s later
        _store(s_q, s.view(C, ab, Bsz, P), tb, buf)
        torch.mul(q[..., t0 : t0 + tb], s_q, out=y[..., t0 : t0 + tb])
        halo = kbuf[:, -1]
        if save:
            # With starts, kbuf and k' are views into buffers with a row per pair correction; saved
            # as contiguous copies they have the shapes and strides they have without documents,
            # which a custom op's fake implementation must predict (`kernels.ops`). Backward
            # rebuilds the pair rows from kbuf.
            if bp is not None and keep_ext:
                saved.append((kext, kp, vb, s_q, before, kvx))
                continue
            if bp is not None:
                kbuf, kp = kbuf.contiguous(), kp.contiguous()
            saved.append((kbuf, kp, vb, s_q, before))
    kv_last = kv.view(C, ab, Bsz, P)[:, -1].clone()
    return y, before[:, -1].clone(), kv_last, saved


def _fill_pairs(ext, mask, bp, negate=False):
    """ext (C, R + n, P): a block's R rows, then one free row per start at an offset > 0 inside a
    chunk (`pair_rows`, n of them): those rows get their chunk's row times mask (negated)."""
    n = bp.pair_rows.numel()
    if n:
        R = ext.shape[1] - n
        torch.mul(ext[:, :R].index_select(1, bp.pair_rows), mask, out=ext[:, R:])
        if negate:
            ext[:, R:].neg_()
    return ext


def _cross_starts(x_ext, W, bp):
    """x @ W chunk by chunk, without the products that cross a start inside a chunk: per start
    at an offset o > 0, its row's inputs before it (`pair_in`) times W, at the outputs from it to
    the row's next start (`pair_out`). The in-chunk product of both SSMs (S0, the Toeplitz).

    x_ext (C, R + n, P): x's R rows and n free ones, which take the masked pair rows. Two ways,
    by the block's density of starts (`bp.halves`, `kernels.documents`):
    - few starts: the pair rows ride in the block's own product as extra rows, so W (a C x P x P
      stack) is read once; a separate product of a few rows costs about as much as that read;
    - about one start per chunk or more: a correction needs only half of W (a start at o <= P/2,
      the first `n_early`, has its inputs in W's rows [0, P/2); a later one its outputs in its
      columns [P/2, P)), two half products instead of doubling the block's rows.
    Returns (C, R, P) (a view when riding)."""
    n = bp.pair_rows.numel()
    R = x_ext.shape[1] - n
    if not bp.halves:
        out = torch.bmm(_fill_pairs(x_ext, bp.pair_in, bp), W)
        if n:
            out[:, :R].index_add_(1, bp.pair_rows, out[:, R:].mul_(bp.pair_out), alpha=-1)
        return out[:, :R]
    out = torch.bmm(x_ext[:, :R], W)
    pairs = _fill_pairs(x_ext, bp.pair_in, bp)[:, R:]
    ne, h = bp.n_early, W.shape[-1] // 2
    if ne:
        corr = torch.bmm(pairs[:, :ne, :h], W[:, :h]).mul_(bp.pair_out[:, :ne])
        out.index_add_(1, bp.pair_rows[:ne], corr, alpha=-1)
    if ne < n:
        corr = torch.bmm(pairs[:, ne:], W[:, :, h:]).mul_(bp.pair_out[:, ne:, h:])
        out[:, :, h:].index_add_(1, bp.pair_rows[ne:], corr, alpha=-1)
    return out


def _cross_starts_backward(g_ext, x_ext, W_t, g_W, bp, need_x=True):
    """Backward of `_cross_starts`. g_ext (C, R + n, P): d loss / d out in its first R rows (the
    rest free); x_ext: x with its pair rows as the forward filled them. Adds to g_W; returns
    d loss / d x in the first R rows of a (C, R + n, P) or (C, R, P) tensor (None without need_x).

    The weight gradient always lets the pairs ride: they add to the product's inner dimension,
    which costs far less than a separate product with an inner dimension of a few pairs. The
    input gradient takes the forward's way (`bp.halves`)."""
    n = bp.pair_rows.numel()
    R = x_ext.shape[1] - n
    g_W.baddbmm_(x_ext.transpose(1, 2), _fill_pairs(g_ext, bp.pair_out, bp, negate=True))
    if not need_x:
        return None
    if not bp.halves:
        g_x = torch.bmm(g_ext, W_t)
        if n:
            g_x[:, :R].index_add_(1, bp.pair_rows, g_x[:, R:].mul_(bp.pair_in))
        return g_x
    g_x = torch.bmm(g_ext[:, :R], W_t)
    ne, h, gp = bp.n_early, W_t.shape[-1] // 2, g_ext[:, R:]  # gp: the pairs' gradients, negated
    if ne:
        corr = torch.bmm(gp[:, :ne], W_t[:, :, :h]).mul_(bp.pair_in[:, :ne, :h])
        g_x[:, :, :h].index_add_(1, bp.pair_rows[:ne], corr)
    if ne < n:
        corr = torch.bmm(gp[:, ne:, h:], W_t[:, h:]).mul_(bp.pair_in[:, ne:])
        g_x.index_add_(1, bp.pair_rows[ne:], corr)
    return g_x


def _shift_starts(kext, Bsz, S0, S1, bp):
    """k' of a block (C, ab B, P, a view) with no tap across a start: the previous chunk's band
    S1 reads that chunk's inputs from its last start on and writes this chunk's outputs before its
    first start (masks: the halo's starts need nothing else), the in-chunk band S0 loses the
    products that cross a start (`_cross_starts`). kext: (C, (ab + 1) B + n, P), the halo
    chunk's rows, the block's, and one free row per pair correction."""
    R = kext.shape[1] - Bsz - bp.pair_rows.numel()
    k_prev = kext[:, :R] * bp.prev_tail
    return _cross_starts(kext[:, Bsz:], S0, bp).addcmul_(torch.bmm(k_prev, S1), bp.head)


def _shift_starts_backward(g_ext, kext, Bsz, S0, S1, g_S0, g_S1, bp, need_k):
    """Backward of `_shift_starts` for one block. g_ext (C, R [+ anything], P): d loss / d k' in
    its first R rows. Adds to g_S0 and g_S1; returns (None without need_k) the gradients of the
    block's own chunks through S0 and of each row's previous chunk (the halo for the first
    chunk) through S1, both (C, ab, B, P)."""
    C, _, P = kext.shape
    R = kext.shape[1] - Bsz - bp.pair_rows.numel()
    g_head = g_ext[:, :R] * bp.head
    k_prev = kext[:, :R] * bp.prev_tail
    g_S1.baddbmm_(k_prev.transpose(1, 2), g_head)
    g_cur = _cross_starts_backward(g_ext, kext[:, Bsz:], S0.transpose(1, 2), g_S0, bp, need_k)
    if not need_k:
        return None, None
    g_prev = torch.bmm(g_head, S1.transpose(1, 2)).mul_(bp.prev_tail)
    return g_cur[:, :R].view(C, -1, Bsz, P), g_prev.view(C, -1, Bsz, P)


class _BlockedH3(torch.autograd.Function):
    """y = q * DiagSSM(ShiftSSM(k) * v) over blocks (`_blocked_forward`), with a hand-written
    backward that walks the blocks in reverse, carrying the diagonal state's gradient and the
    halo's gradient (into the previous block's last chunk of k) back across block boundaries.

    Inputs: q, k, v (B, C, L) any strides; w_shift = [S0 | S1] (C, P, 2P); toep (C, P, P),
    to_state (C, P, N), from_state (C, N, P), decay = dA^P (C, N/2) complex; x0 (C, B, N/2)
    complex or None; T the block length. The small matrices come from `_ShiftMats` /
    `_DiagMats`, which take their gradients back to the SSM parameters.
    Outputs: y (q's layout), the state before the last chunk (C, B, N/2), k'v of the last chunk
    (C, B, P) (the caller closes the final state from these two).
    """

    @staticmethod
    def forward(ctx, q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, plan=None):
        mats = (w_shift, toep, to_state, from_state, decay)
        y, before_last, kv_last, saved = _blocked_forward(q, k, v, *mats, x0, T, True, plan, keep_ext=True)
        ctx.T, ctx.has_x0, ctx.plan = T, x0 is not None, plan
        ctx.block_sizes = [len(blk) for blk in saved]
        ctx.save_for_backward(q, k, v, *mats, *(t for blk in saved for t in blk))
        return y, before_last, kv_last

    @staticmethod
    @_no_autocast
    def backward(ctx, gy, g_before_last, g_kv_last):
        q, k, v, w_shift, toep, to_state, from_state, decay, *flat = ctx.saved_tensors
        sizes = getattr(ctx, "block_sizes", None) or [5] * (len(flat) // 5)  # 6: `keep_ext` blocks
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        blocks = [flat[o : o + n] for o, n in zip(offsets, sizes)]
        Bsz, C, L = q.shape
        P = w_shift.shape[1]
        n2 = decay.shape[-1]
        rdtype, cdtype, dev = w_shift.dtype, decay.dtype, q.device
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        g_q = _like_layout(q, L, q.dtype) if need_q else None
        g_k = _like_layout(k, L, k.dtype) if need_k else None
        g_v = _like_layout(v, L, v.dtype) if need_v else None
        plan = ctx.plan
        # Accumulators, contiguous (in-place baddbmm_ on a strided one runs matrix by matrix).
        g_S0, g_S1 = (torch.zeros(C, P, P, dtype=rdtype, device=dev) for _ in range(2))
        g_toep, g_ts = torch.zeros_like(toep), torch.zeros_like(to_state)
        g_fs_t = torch.zeros(C, P, 2 * n2, dtype=rdtype, device=dev)
        g_w = torch.zeros_like(decay)
        g_x = torch.zeros(C, Bsz, n2, dtype=cdtype, device=dev)  # d loss / d state entering the next block
        wc = decay.conj().unsqueeze(1)
        S0, S1 = w_shift[..., :P], w_shift[..., P:]
        S0_t, S1_t, toep_t, ts_t, fs_t = (t.transpose(1, 2) for t in (S0, S1, toep, to_state, from_state))
        buf = torch.empty(Bsz * C * min(ctx.T, -(-L // P) * P), dtype=rdtype, device=dev)
        g_halo = None
        spans = _spans(L, ctx.T, P)
        for i in range(len(spans) - 1, -1, -1):
            (t0, tb, tp), (kbuf, kp, vb, s_q, before, *kvx_saved) = spans[i], blocks[i]
            ab = tp // P
            R = ab * Bsz
            rows = (C, R, P)
            last = i == len(spans) - 1
            bp = plan.blocks[i] if plan is not None else None
            gyb = gy[..., t0 : t0 + tb].to(rdtype)  # products in fp32 for half-precision inputs
            if need_q:
                torch.mul(gyb, s_q, out=g_q[..., t0 : t0 + tb])
            g_s_q = _like_layout(q, tb, rdtype)
            torch.mul(gyb, q[..., t0 : t0 + tb], out=g_s_q)
            if bp is None:
                g_s = torch.empty(C, ab, Bsz, P, dtype=rdtype, device=dev)
                _load(g_s, g_s_q, 0, tb, buf)  # zero beyond tb
                g_s = g_s.view(rows)
            else:  # and a free row per pair correction (`_cross_starts_backward`)
                g_sx = torch.empty(C, R + bp.pair_rows.numel(), P, dtype=rdtype, device=dev)
                g_s = g_sx[:, :R]
                _load(g_s.view(C, ab, Bsz, P), g_s_q, 0, tb, buf)
            before_r = torch.view_as_real(before).view(C, ab * Bsz, 2 * n2)
            g_sh = g_s if bp is None else g_s * bp.head  # what the incoming states reached
            g_fs_t.baddbmm_(g_sh.transpose(1, 2), before_r)
            g_before = torch.view_as_complex(torch.bmm(g_sh, fs_t).view(C, ab, Bsz, n2, 2))
            if last:
                g_before[:, -1] += g_before_last
            # Reverse scan: g_ends[a] = d loss / d state entering chunk a + 1.
            g_ends = torch.empty_like(before)
            g_ends[:, ab - 1] = g_x
            wk = None if bp is None else wc.unsqueeze(1) * bp.keep
            for a in range(ab - 1, 0, -1):
                torch.addcmul(g_before[:, a], wc if wk is None else wk[:, a], g_ends[:, a], out=g_ends[:, a - 1])
            g_x = torch.addcmul(g_before[:, 0], wc if wk is None else wk[:, 0], g_ends[:, 0])
            g_w += (g_ends * before.conj() if bp is None else g_ends * before.conj() * bp.keep).sum((1, 2))
            g_ends_r = torch.view_as_real(g_ends).view(C, ab * Bsz, 2 * n2)
            vbr = vb.view(rows)
            if bp is None:
                kv = kp * vbr
                g_toep.baddbmm_(kv.transpose(1, 2), g_s)
                g_ts.baddbmm_(kv.transpose(1, 2), g_ends_r)
                g_kv = torch.bmm(g_s, toep_t).baddbmm_(g_ends_r, ts_t)
            else:  # end states only from each chunk's last start on; the in-chunk products that crossed a start
                if kvx_saved:  # saved by the forward with its pair rows (`keep_ext`)
                    kvx = kvx_saved[0]
                    kv = kvx[:, :R]
                else:
                    kvx = torch.empty(C, R + bp.pair_rows.numel(), P, dtype=rdtype, device=dev)
                    kv = torch.mul(kp, vbr, out=kvx[:, :R])
                    _fill_pairs(kvx, bp.pair_in, bp)
                g_ts.baddbmm_((kv * bp.tail).transpose(1, 2), g_ends_r)
                g_kvx = _cross_starts_backward(g_sx, kvx, toep_t, g_toep, bp)
                g_kv = g_kvx[:, :R].addcmul_(torch.bmm(g_ends_r, ts_t), bp.tail)
            if last:
                g_kv.view(C, ab, Bsz, P)[:, -1] += g_kv_last
            if need_v:
                _store(g_v[..., t0 : t0 + tb], (g_kv * kp).view(C, ab, Bsz, P), tb, buf)
            if bp is not None and g_kvx.shape[1] < R + bp.pair_rows.numel():
                # Half products left g_kvx without free rows; the shift SSM's backward needs them.
                g_kvx = torch.empty(C, R + bp.pair_rows.numel(), P, dtype=rdtype, device=dev)
                g_kp = torch.mul(g_kv, vbr, out=g_kvx[:, :R])
            else:
                g_kp = g_kv.mul_(vbr)
            if bp is None:
                g_S0.baddbmm_(kbuf[:, 1:].reshape(rows).transpose(1, 2), g_kp)
                g_S1.baddbmm_(kbuf[:, :-1].reshape(rows).transpose(1, 2), g_kp)  # the previous chunks
                if need_k:
                    gk = torch.bmm(g_kp, S0_t).view(C, ab, Bsz, P)
                    g_kp4 = g_kp.view(C, ab, Bsz, P)
                    if ab > 1:  # chunk a also fed chunk a + 1 through S1
                        g_next = g_kp4[:, 1:].reshape(C, (ab - 1) * Bsz, P)
                        gk[:, :-1] += torch.bmm(g_next, S1_t).view(C, ab - 1, Bsz, P)
                    g_halo_here = torch.bmm(g_kp4[:, 0], S1_t)
            else:
                if kvx_saved:  # kbuf is the forward's kext, pair rows filled
                    kext = kbuf
                else:
                    kext = torch.empty(C, R + Bsz + bp.pair_rows.numel(), P, dtype=rdtype, device=dev)
                    kext[:, : R + Bsz].copy_(kbuf.view(C, R + Bsz, P))
                    _fill_pairs(kext[:, Bsz:], bp.pair_in, bp)  # the pair rows as the forward filled them
                gk, g_prev = _shift_starts_backward(g_kvx, kext, Bsz, S0, S1, g_S0, g_S1, bp, need_k)
                if need_k:
                    if ab > 1:  # chunk a also fed chunk a + 1 through S1
                        gk[:, :-1] += g_prev[:, 1:]
                    g_halo_here = g_prev[:, 0]
            if need_k:
                if g_halo is not None:
                    gk[:, -1] += g_halo  # the next block read this chunk as its halo
                g_halo = g_halo_here
                _store(g_k[..., t0 : t0 + tb], gk, tb, buf)
        x0_grad = g_x if ctx.has_x0 else None
        g_ws = torch.cat((g_S0, g_S1), dim=2)
        return g_q, g_k, g_v, g_ws, g_toep, g_ts, g_fs_t.transpose(1, 2), g_w, x0_grad, None, None


@_no_autocast
def _h3_core_chunked(
    q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state, return_state, P=_CHUNK, block=None, doc_start=None
):
    Bsz, C, L = q.shape
    N = shift_B.shape[-1]
    if N > P:
        raise ValueError(f"shift SSM with {N} taps needs chunks of at least {N}, got {P}")
    rdtype = _real_dtype(q.dtype)
    T = block_length(C, Bsz, L, P) if block is None else int(block)
    if T <= 0 or T % P:
        raise ValueError(f"block length must be a positive multiple of {P}, got {T}")

    # Shift SSM: k' = k @ S0 (this chunk) + k_prev @ S1 (previous chunk's tail), Dk at lag 0.
    routed = _ops.routed()
    shift_args = (shift_B.to(rdtype), shift_C.to(rdtype), shift_D.to(rdtype), P)
    w_shift = _ops.shift_mats(*shift_args) if routed else _ShiftMats.apply(*shift_args)  # (C, P, 2P)
    diag_args = (ssm.dA, ssm.dB, ssm.C, D, P, rdtype)
    toep, to_state, from_state, decay = _ops.diag_mats(*diag_args) if routed else _DiagMats.apply(*diag_args)
    cdtype = decay.dtype
    x0 = initial_state.to(cdtype).transpose(0, 1).contiguous() if initial_state is not None else None
    args = (q, k, v, w_shift, toep, to_state, from_state, decay, x0, T)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:9])
    if routed:  # hippo::h3_blocks builds the ChunkPlan inside, from doc_start
        y, before_last, kv_last, last_tail, last_keep = _ops.h3_blocks(*args, doc_start, grad)
    else:
        # One plan per map and blocks, shared by the layers of a forward (`kernels.documents.shared_plan`).
        plan = shared_plan(doc_start, _spans(L, T, P), P, rdtype) if doc_start is not None else None
        if grad:
            y, before_last, kv_last = _BlockedH3.apply(*args, plan)
        else:
            y, before_last, kv_last, _ = _blocked_forward(*args, False, plan)
        last_tail, last_keep = (None, None) if plan is None else (plan.last_tail, plan.last_keep)
    if not return_state:
        return y
    # State after position L-1, closed from the state before the last chunk and its r inputs
    # (the chunk grid may run past L; dividing out padded steps would not be stable); with
    # documents only the last one's inputs, and the carry only if the last chunk has no start
    # (through the op, the masks are ones where doc_start has no start: the same numbers).
    r = L - (-(-L // P) - 1) * P
    if last_tail is not None and last_tail.numel():
        kv_last = kv_last * last_tail.unsqueeze(0)
        before_last = before_last * last_keep.unsqueeze(0)
    g = (ssm.dB.to(torch.complex128).unsqueeze(-1) * dA_powers(ssm.dA, range(r)).flip(-1)).to(cdtype)  # (C, N/2, r)
    state = torch.einsum("cbl,cnl->bcn", kv_last[..., :r].to(cdtype), g)
    return y, state + before_last.transpose(0, 1) * dA_powers(ssm.dA, range(r, r + 1))[..., 0].to(cdtype)


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
    doc_start: torch.Tensor | None = None,
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
        doc_start: optional (B, L) bool, True where a new document begins (`kernels.documents`):
            each document's outputs see only its own inputs, exactly (no shift tap crosses a
            start, the diagonal state restarts there; a start at 0 drops initial_state), and the
            returned state is the last document's. "reference" and "torch" only ("auto" runs
            "torch"). None: today's computation, unchanged.
    Returns:
        y (B, C, L) in q's dtype (computed in fp32, or fp64 for fp64 inputs)[, state].
    """
    if doc_start is not None:
        check_doc_start(doc_start, q.shape[0], q.shape[-1])
    impl = _resolve_impl(impl, q.device, k.dtype, q.shape[-1], initial_state is not None or return_state,
                         documents=doc_start is not None)
    if impl == "triton":
        return _h3_core_triton(q, k, v, shift_B, shift_C, shift_D, ssm, D)
    if impl == "reference":
        return h3_core_ref(
            q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state=initial_state, return_state=return_state,
            doc_start=doc_start,
        )
    return _h3_core_chunked(q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state, return_state,
                            doc_start=doc_start)


def _h3_core_triton(q, k, v, shift_B, shift_C, shift_D, ssm, D):
    """Two fused FlashConv launches; the kernels are torch ops, so SSM parameters get gradients."""
    from hippo.kernels._flashconv_triton import flashconv  # triton is optional: import on use

    L = q.shape[-1]
    N = shift_B.shape[-1]
    kp = flashconv(k, shift_kernel(shift_B, shift_C, min(L, N)), shift_D)  # (B, C, L): k'
    return flashconv(kp, diagonal_kernel(ssm, L), D, v=v, q=q)


def h3_core_ref(
    q, k, v, shift_B, shift_C, shift_D, ssm, D, *, initial_state=None, return_state=False, doc_start=None
):
    """The reference path: full-length FFT convolutions with the materialized kernels; with
    doc_start, each document of each row run alone (from the initial state only if it is the
    row's first and no start is at 0) and the outputs put back in place."""
    if doc_start is not None and doc_start.any():
        return _ref_documents(q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state, return_state, doc_start)
    L = q.shape[-1]
    N = shift_B.shape[-1]
    kp = fftconv(k, shift_kernel(shift_B, shift_C, min(L, N)), shift_D)
    kv = kp * v
    s = fftconv(kv, diagonal_kernel(ssm, L), D)
    if initial_state is not None:
        pw = dA_powers(ssm.dA, range(1, L + 1)).to(ssm.dA.dtype)  # (C, N/2, L): the plain Vandermonde
        s = s + 2 * torch.einsum("bcn,cnl->bcl", initial_state.to(ssm.dA.dtype) * ssm.C, pw).real.to(s.dtype)
    y = q * s
    if not return_state:
        return y
    return y, diagonal_state_from_prefix(kv, ssm, initial_state)


def _ref_documents(q, k, v, shift_B, shift_C, shift_D, ssm, D, initial_state, return_state, doc_start):
    ys, states = [], []
    for b in range(q.shape[0]):
        parts, state = [], None
        for start, end in document_spans(doc_start[b]):
            x0 = None
            if initial_state is not None and start == 0 and not bool(doc_start[b, 0]):
                x0 = initial_state[b : b + 1]
            rows = (t[b : b + 1, :, start:end] for t in (q, k, v))
            out = h3_core_ref(*rows, shift_B, shift_C, shift_D, ssm, D, initial_state=x0, return_state=return_state)
            if return_state:
                out, state = out
            parts.append(out)
        ys.append(torch.cat(parts, dim=-1))
        states.append(state)
    y = torch.cat(ys)
    return (y, torch.cat(states)) if return_state else y


def diagonal_conv(
    x: torch.Tensor, ssm: DiscreteDiagonalSSM, D: torch.Tensor, *, doc_start: torch.Tensor
) -> torch.Tensor:
    """The diagonal SSM alone (S4D), y = causal_conv(x, Kd) + D x, with each document of
    `doc_start` isolated: the chunked H3 core with q = v = 1 and an identity shift SSM (one tap
    of 0, skip 1), so its exact state restarts serve S4D too. x: (B, C, L); returns x's dtype."""
    check_doc_start(doc_start, x.shape[0], x.shape[-1])
    C = x.shape[1]
    ones = x.new_ones(1, 1, 1).expand_as(x)
    zero_tap = x.new_zeros(C, 1, dtype=torch.float32)
    return _h3_core_chunked(ones, x, ones, zero_tap, zero_tap, torch.ones_like(D, dtype=torch.float32), ssm, D,
                            None, False, doc_start=doc_start)
