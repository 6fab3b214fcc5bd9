"""The H3 kernels as PyTorch custom ops (namespace `hippo::`), so `torch.compile` traces through them.

Hippo's kernels are hand-written autograd Functions (`_ShiftMats`, `_DiagMats`, `_BlockedH3`,
`_DiagonalKernel`, `FlashConvFn`) and FFT code inductor cannot generate (complex operators).
Dynamo cannot trace their bodies (`out=` into strided views, `doc_start.any()`, the ChunkPlan's
`nonzero`): a tiny H3 layer's forward was 9 graphs (8 breaks), 15 with documents. A custom op is
one opaque node with a fake (shape) implementation and a registered backward: one graph, none.

Each op runs the existing implementation unchanged, and its registered backward reuses that
implementation's own backward through `_Ctx` (a stand-in for the autograd ctx): the outputs and
gradients are bit for bit those of the Functions (tests/kernels/test_custom_ops.py). Where a
backward is plain torch ops (`_ShiftMats`, `_DiagMats`, `_DiagonalKernel`, `fftconv`) it runs in
the registered backward itself, so AOTAutograd traces it and double backward keeps working;
where it is not (the blocked core's reverse walk, the Triton kernels) it is an op of its own.
The decode steps update their state in place (declared mutated) and have no backward.

Costs: each op call adds Python dispatch (an H3 layer's fwd+bwd makes 4 op calls: ~1 ms at tiny
shapes, 4-5% at B 4, d 256, L 1K; benchmarks/bench_custom_ops.py), which is why only compiled
code goes through them (`routed`), and with
documents the ChunkPlan is looked up from `doc_start` in each op (an op cannot keep a Python
object between the two), which `documents.shared_plan` answers with one build per map.

Custom-op rules that shaped the signatures (torch/_library/custom_ops.py, infer_schema.py):
arguments are tensors, ints, floats, bools, dtypes and lists of them, so `DiscreteDiagonalSSM`
goes in as its tensors and `ChunkPlan` is rebuilt inside from `doc_start`; no output may alias
an input or another output; a fake implementation must give the real one's sizes, strides and
storage offsets (opcheck compares them), which is why most fakes run the implementation itself
on fake tensors. `torch.library.custom_op` / `register_fake` / `register_autograd` are in
torch >= 2.4, the package's floor.

Eager calls run the Functions (see `routed`): the ops are for the compiler. `always()` sends eager
calls through the ops (the tests' bit-for-bit comparison), `direct()` keeps the Functions even
while compiling (a way out if an op misbehaves). This module imports only torch (and `torch_compat`) at import time: the implementations'
modules import it, so it reaches them at call time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from hippo.kernels.torch_compat import eager_view_dispatch

__all__ = [
    "always",
    "diag_mats",
    "diagonal_decode_step",
    "diagonal_kernel",
    "direct",
    "fftconv",
    "flashconv",
    "h3_blocks",
    "routed",
    "shift_mats",
    "shift_ring_step",
]

_route: bool | None = None  # None: through the ops while torch.compile traces, else the Functions


def routed() -> bool:
    """True where the public kernels call the `hippo::` ops: while `torch.compile` traces (where
    the Functions would break the graph), or inside `always()`. Eager calls run the Functions
    themselves: the same numbers bit for bit, without the ops' dispatch, which cost an eager H3
    layer 4-5% at B 4, d 256, L 1K (193.9 vs 183.8 ms on one thread, 138.5 vs 133.4 on two,
    interleaved medians; main at 1641108)."""
    return torch.compiler.is_compiling() if _route is None else _route


@contextlib.contextmanager
def _routing(route: bool) -> Iterator[None]:
    global _route
    before, _route = _route, route
    try:
        yield
    finally:
        _route = before


def always() -> contextlib.AbstractContextManager[None]:
    """Within it, eager calls go through the `hippo::` ops too (the tests compare them bit for bit
    with the Functions)."""
    return _routing(True)


def direct() -> contextlib.AbstractContextManager[None]:
    """Within it, the public kernels call the autograd Functions even while compiling (a way out
    if an op misbehaves; the graph then breaks at each kernel)."""
    return _routing(False)


def _mod(name: str):
    return importlib.import_module(f"hippo.kernels.{name}")


def _eager_views(fn):
    """Run an op's body with the conjugate / negative view fallbacks on, as in eager.

    AOTAutograd runs a compiled graph below ADInplaceOrView, which also excludes the Conjugate and
    Negative keys: inside an opaque op, `x.conj()` then stays an unresolved view that later ops
    read as x (opcheck: `torch.view_as_real(2 * cb.conj())` in `_DiagMats` gave +Im, and
    `_BlockedH3.backward`'s `decay.conj()` would be read unconjugated). The bodies are eager code
    on real tensors: give them eager's dispatch back (`torch_compat.eager_view_dispatch`).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with eager_view_dispatch():
            return fn(*args, **kwargs)

    return wrapper


class _Ctx:
    """Stands in for an autograd ctx so a Function's own forward / backward run inside an op."""

    def __init__(self, saved: Sequence[Tensor | None] = (), needs: Sequence[bool] = (), **attrs):
        self.saved_tensors = tuple(saved)
        self.needs_input_grad = tuple(needs)
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Ops return Tensor[] (no None in a schema's returns): an empty tensor stands for "no gradient"."""
    return like.new_empty(0) if t is None else t


# ----------------------------------------------------------------------------- fftconv
@torch.library.custom_op("hippo::fftconv", mutates_args=())
@_eager_views
def _fftconv_op(u: Tensor, k: Tensor) -> Tensor:
    return _mod("fftconv").causal_fftconv(u, k)


_fftconv_op.register_fake(lambda u, k: _mod("fftconv").causal_fftconv(u, k))


def _fftconv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fftconv_backward(ctx, grad):
    u, k = ctx.saved_tensors
    return _mod("fftconv").causal_fftconv_backward(grad, u, k, ctx.needs_input_grad)


_fftconv_op.register_autograd(_fftconv_backward, setup_context=_fftconv_setup)


def fftconv(u: Tensor, k: Tensor) -> Tensor:
    """`fftconv.causal_fftconv`: the causal convolution of `fftconv` without its skip term."""
    return _fftconv_op(u, k)


# ----------------------------------------------------------------------------- diagonal kernel
@torch.library.custom_op("hippo::diagonal_kernel", mutates_args=())
@_eager_views
def _diagonal_kernel_op(cb: Tensor, dA: Tensor, length: int) -> Tensor:
    return _mod("ssm")._DiagonalKernel.forward(_Ctx(), cb, dA, length)


_diagonal_kernel_op.register_fake(lambda cb, dA, length: _mod("ssm")._DiagonalKernel.forward(_Ctx(), cb, dA, length))


def _diagonal_kernel_setup(ctx, inputs, output):
    cb, dA, length = inputs
    ctx.save_for_backward(cb, dA)
    ctx.length = length


def _diagonal_kernel_backward(ctx, grad):
    # Plain torch ops (traced by AOTAutograd; double backward works as with the Function).
    return _mod("ssm")._DiagonalKernel.backward(_Ctx(ctx.saved_tensors, ctx.needs_input_grad, length=ctx.length), grad)


_diagonal_kernel_op.register_autograd(_diagonal_kernel_backward, setup_context=_diagonal_kernel_setup)


def diagonal_kernel(cb: Tensor, dA: Tensor, length: int) -> Tensor:
    return _diagonal_kernel_op(cb, dA, length)


# ----------------------------------------------------------------------------- chunk matrices
@torch.library.custom_op("hippo::shift_mats", mutates_args=())
@_eager_views
def _shift_mats_op(B: Tensor, C: Tensor, D: Tensor, P: int) -> Tensor:
    return _mod("h3_core")._ShiftMats.forward(_Ctx(), B, C, D, P)


_shift_mats_op.register_fake(lambda B, C, D, P: _mod("h3_core")._ShiftMats.forward(_Ctx(), B, C, D, P))


def _shift_mats_setup(ctx, inputs, output):
    B, C, _, _ = inputs
    ctx.save_for_backward(B, C)


def _shift_mats_backward(ctx, grad):
    return _mod("h3_core")._ShiftMats.backward(_Ctx(ctx.saved_tensors), grad)


_shift_mats_op.register_autograd(_shift_mats_backward, setup_context=_shift_mats_setup)


def shift_mats(B: Tensor, C: Tensor, D: Tensor, P: int) -> Tensor:
    """`h3_core._ShiftMats`: the shift SSM's banded Toeplitz [S0 | S1] (C, P, 2P)."""
    return _shift_mats_op(B, C, D, P)


def _diag_mats_impl(dA, dB, Cm, D, P, rdtype):
    ctx = _Ctx()
    toep, to_state, from_state, decay = _mod("h3_core")._DiagMats.forward(ctx, dA, dB, Cm, D, P, rdtype)
    pwc, cpw, _, _ = ctx.saved_tensors  # the other two are dB, C in the complex dtype: rebuilt in backward
    return toep, to_state, from_state, decay, pwc, cpw


@torch.library.custom_op("hippo::diag_mats", mutates_args=())
@_eager_views
def _diag_mats_op(
    dA: Tensor, dB: Tensor, C: Tensor, D: Tensor, P: int, rdtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _diag_mats_impl(dA, dB, C, D, P, rdtype)


_diag_mats_op.register_fake(_diag_mats_impl)


def _diag_mats_setup(ctx, inputs, output):
    dA, dB, Cm, D, _, _ = inputs
    ctx.mark_non_differentiable(*output[4:])
    ctx.set_materialize_grads(False)  # no zeros for the saved powers; the four used are filled below
    ctx.save_for_backward(output[4], output[5], dB, Cm)
    ctx.dtypes = (dA.dtype, dB.dtype, Cm.dtype, D.dtype)
    ctx.out_meta = [(t.shape, t.dtype, t.device) for t in output[:4]]


def _zeros_for_none(grads, meta):
    """The zeros autograd would have materialized for outputs that got no gradient."""
    return [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, meta)]


def _diag_mats_backward(ctx, g_toep, g_to, g_from, g_decay, _g_pw, _g_cpw):
    g_toep, g_to, g_from, g_decay = _zeros_for_none((g_toep, g_to, g_from, g_decay), ctx.out_meta)
    pwc, cpw, dB, Cm = ctx.saved_tensors
    inner = _Ctx((pwc, cpw, dB.to(pwc.dtype), Cm.to(pwc.dtype)), dtypes=ctx.dtypes)
    return _mod("h3_core")._DiagMats.backward(inner, g_toep, g_to, g_from, g_decay)


_diag_mats_op.register_autograd(_diag_mats_backward, setup_context=_diag_mats_setup)


def diag_mats(dA: Tensor, dB: Tensor, C: Tensor, D: Tensor, P: int, rdtype: torch.dtype):
    """`h3_core._DiagMats`: (toep, to_state, from_state, decay) of the chunked diagonal SSM."""
    return _diag_mats_op(dA, dB, C, D, P, rdtype)[:4]


# ----------------------------------------------------------------------------- blocked H3 core
def _plan(doc_start: Tensor | None, L: int, T: int, P: int, rdtype: torch.dtype):
    """The `ChunkPlan` of `doc_start` (None without starts) wherever an op needs it: the one
    `documents.shared_plan` keeps for the map, so the layers of a forward and the backward ops
    reuse one build while they see the same map."""
    if doc_start is None:
        return None
    return _mod("documents").shared_plan(doc_start, _mod("h3_core")._spans(L, T, P), P, rdtype)


def _last_masks(plan, doc_start: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(B, P), (B, 1) masks in like's dtype that close the final state with documents
    (`ChunkPlan.last_tail`, `.last_keep`, as contiguous copies; ones without starts, empty
    without doc_start). like: w_shift (C, P, 2P)."""
    if doc_start is None:
        return like.new_empty(0), like.new_empty(0)
    B, P = doc_start.shape[0], like.shape[1]
    if plan is None:
        return like.new_ones(B, P), like.new_ones(B, 1)
    return (plan.last_tail.clone(memory_format=torch.contiguous_format),
            plan.last_keep.clone(memory_format=torch.contiguous_format))


def _h3_blocks_impl(q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, save, fake=False):
    P = w_shift.shape[1]
    plan = None if fake else _plan(doc_start, q.shape[-1], T, P, w_shift.dtype)
    y, before_last, kv_last, saved = _mod("h3_core")._blocked_forward(
        q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, save, plan
    )
    if fake and doc_start is not None:  # the masks' shapes, without reading doc_start
        tail, keep = (w_shift.new_empty(doc_start.shape[0], n) for n in (P, 1))
    else:
        tail, keep = _last_masks(plan, doc_start, w_shift)
    return y, before_last, kv_last, tail, keep, [t for blk in saved for t in blk]


@torch.library.custom_op("hippo::h3_blocks", mutates_args=())
@_eager_views
def _h3_blocks_op(
    q: Tensor, k: Tensor, v: Tensor, w_shift: Tensor, toep: Tensor, to_state: Tensor, from_state: Tensor,
    decay: Tensor, x0: Tensor | None, T: int, doc_start: Tensor | None, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    return _h3_blocks_impl(q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, save)


@_h3_blocks_op.register_fake
def _(q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, save):
    return _h3_blocks_impl(q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, save, fake=True)


def _h3_blocks_backward_impl(gy, g_before_last, g_kv_last, q, k, v, w_shift, toep, to_state, from_state, decay,
                             x0, T, doc_start, saved, needs, fake=False):
    plan = None if fake else _plan(doc_start, q.shape[-1], T, w_shift.shape[1], w_shift.dtype)
    ctx = _Ctx((q, k, v, w_shift, toep, to_state, from_state, decay, *saved), needs, T=T, has_x0=x0 is not None,
               plan=plan)
    grads = _mod("h3_core")._BlockedH3.backward(ctx, gy, g_before_last, g_kv_last)[:9]
    return [_or_empty(g, q) for g in grads]


@torch.library.custom_op("hippo::h3_blocks_backward", mutates_args=())
@_eager_views
def _h3_blocks_backward_op(
    gy: Tensor, g_before_last: Tensor, g_kv_last: Tensor, q: Tensor, k: Tensor, v: Tensor, w_shift: Tensor,
    toep: Tensor, to_state: Tensor, from_state: Tensor, decay: Tensor, x0: Tensor | None, T: int,
    doc_start: Tensor | None, saved: list[Tensor], needs: list[bool],
) -> list[Tensor]:
    return _h3_blocks_backward_impl(gy, g_before_last, g_kv_last, q, k, v, w_shift, toep, to_state, from_state,
                                    decay, x0, T, doc_start, saved, needs)


@_h3_blocks_backward_op.register_fake
def _(gy, g_before_last, g_kv_last, q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, saved,
      needs):
    return _h3_blocks_backward_impl(gy, g_before_last, g_kv_last, q, k, v, w_shift, toep, to_state, from_state,
                                    decay, x0, T, doc_start, saved, needs, fake=True)


def _h3_blocks_setup(ctx, inputs, output):
    q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, save = inputs
    ctx.mark_non_differentiable(output[3], output[4], *output[5])
    # No zeros for the outputs nobody differentiated: autograd would allocate one per saved block
    # tensor (5 x (C, B, L) elements) on every backward; the three that `_BlockedH3.backward`
    # reads are materialized below, as the Function's ctx did.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, w_shift, toep, to_state, from_state, decay, x0, doc_start, *output[5])
    ctx.T, ctx.save = T, save
    ctx.out_meta = [(t.shape, t.dtype, t.device) for t in output[:3]]


def _h3_blocks_backward(ctx, gy, g_before_last, g_kv_last, *_non_differentiable):
    if not ctx.save:
        raise RuntimeError("hippo::h3_blocks was run with save=False: it has no saved blocks to differentiate")
    gy, g_before_last, g_kv_last = _zeros_for_none((gy, g_before_last, g_kv_last), ctx.out_meta)
    q, k, v, w_shift, toep, to_state, from_state, decay, x0, doc_start, *saved = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:9])
    grads = torch.ops.hippo.h3_blocks_backward(gy, g_before_last, g_kv_last, q, k, v, w_shift, toep, to_state,
                                               from_state, decay, x0, ctx.T, doc_start, saved, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, None)


_h3_blocks_op.register_autograd(_h3_blocks_backward, setup_context=_h3_blocks_setup)


def h3_blocks(q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, save):
    """`h3_core._blocked_forward` (with `_BlockedH3.backward` registered when `save`): y, the
    state before the last chunk, k'v of the last chunk, and the last chunk's document masks
    (`ChunkPlan.last_tail`, `.last_keep`; ones without starts, empty without doc_start)."""
    return _h3_blocks_op(q, k, v, w_shift, toep, to_state, from_state, decay, x0, T, doc_start, save)[:5]


# ----------------------------------------------------------------------------- Triton FlashConv
@torch.library.custom_op("hippo::flashconv", mutates_args=())
@_eager_views
def _flashconv_op(u: Tensor, k: Tensor, D: Tensor | None, v: Tensor | None, q: Tensor | None) -> Tensor:
    return _mod("_flashconv_triton").flashconv_rows(u, k, D, v, q)


@_flashconv_op.register_fake
def _(u, k, D, v, q):
    Bsz, C, L = u.shape
    return u.new_empty(Bsz, C, L)


@torch.library.custom_op("hippo::flashconv_backward", mutates_args=())
@_eager_views
def _flashconv_backward_op(
    dy: Tensor, u: Tensor, k: Tensor, D: Tensor | None, v: Tensor | None, q: Tensor | None, needs: list[bool]
) -> list[Tensor]:
    grads = _mod("_flashconv_triton")._flashconv_bwd(dy, u, k, D, v, q, needs)
    # Contiguous, so that the fake below states their strides without running the kernels.
    return [_or_empty(None if g is None else g.contiguous(), u) for g in grads]


@_flashconv_backward_op.register_fake
def _(dy, u, k, D, v, q, needs):
    return [
        _or_empty(None if not n or x is None else x.new_empty(x.shape), u)
        for n, x in zip(needs, (u, k, D, v, q))
    ]


def _flashconv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _flashconv_backward(ctx, dy):
    u, k, D, v, q = ctx.saved_tensors
    needs = [n and x is not None for n, x in zip(ctx.needs_input_grad, (u, k, D, v, q))]
    grads = torch.ops.hippo.flashconv_backward(dy, u, k, D, v, q, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))


_flashconv_op.register_autograd(_flashconv_backward, setup_context=_flashconv_setup)


def flashconv(u: Tensor, k: Tensor, D: Tensor | None, v: Tensor | None, q: Tensor | None) -> Tensor:
    return _flashconv_op(u, k, D, v, q)


# ----------------------------------------------------------------------------- decode steps
# Generation only (no autograd formula: backward through them raises). Each updates its state in
# place (declared in mutates_args), so a compiled decode loop keeps the update in its graph.
@torch.library.custom_op("hippo::diagonal_decode_step", mutates_args=("s",))
@_eager_views
def _diagonal_decode_step_op(s: Tensor, dA: Tensor, out: Tensor, D: Tensor, x: Tensor) -> Tensor:
    ssm = _mod("ssm")
    return ssm.diagonal_decode_step_impl(s, ssm.DiagonalDecoder(dA, out, D), x)


@_diagonal_decode_step_op.register_fake
def _(s, dA, out, D, x):
    ssm = _mod("ssm")
    return ssm.diagonal_decode_step_impl(s, ssm.DiagonalDecoder(dA, out, D), x)


def diagonal_decode_step(s: Tensor, dA: Tensor, out: Tensor, D: Tensor, x: Tensor) -> Tensor:
    """`ssm.diagonal_decode_step` with the `DiagonalDecoder` as its three tensors."""
    return _diagonal_decode_step_op(s, dA, out, D, x)


@torch.library.custom_op("hippo::shift_ring_step", mutates_args=("window",))
@_eager_views
def _shift_ring_step_op(window: Tensor, taps: Tensor, x: Tensor, t: int) -> Tensor:
    return _mod("ssm").shift_ring_step_impl(window, taps, x, t)


_shift_ring_step_op.register_fake(lambda window, taps, x, t: _mod("ssm").shift_ring_step_impl(window, taps, x, t))


def shift_ring_step(window: Tensor, taps: Tensor, x: Tensor, t: int) -> Tensor:
    """`ssm.shift_ring_step`."""
    return _shift_ring_step_op(window, taps, x, t)
