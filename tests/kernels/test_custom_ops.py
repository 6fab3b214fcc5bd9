"""The `hippo::` custom ops (`kernels.ops`): opcheck for each, bit-for-bit equality with the
autograd Functions they wrap (`ops.direct()`), and one compiled H3 layer against eager.

opcheck runs the schema, autograd-registration, fake-tensor (sizes, strides, storage offsets)
and AOTAutograd (dynamic shapes, forward and gradients) checks; it runs each op several times, so
the slow marks below are on the opchecks that take seconds. The Triton op's opcheck is in
tests/gpu/test_gpu_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from hippo.kernels import diagonal_conv, discretize_diagonal, fftconv, h3_core, ops
from hippo.kernels.ssm import diagonal_kernel
from tests.kernels.test_h3_core import _params

P = 64


def _ssm(C, dtype, seed=0):
    sB, sC, sD, raw, D = _params(C, dtype, seed=seed)
    return sB, sC, sD, discretize_diagonal(*raw), D


def _starts(B, L, *positions):
    ds = torch.zeros(B, L, dtype=torch.bool)
    for b, p in positions:
        ds[b, p] = True
    return ds


def _leaf(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# ----------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Lk", [40, 300])
def test_opcheck_fftconv(dtype, Lk):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 100, generator=g, dtype=dtype)
    k = torch.randn(3, Lk, generator=g, dtype=dtype)
    torch.library.opcheck(torch.ops.hippo.fftconv, tuple(_leaf(u, k)))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_opcheck_diagonal_kernel(dtype):
    _, _, _, ssm, _ = _ssm(3, torch.float64)
    cb, dA = _leaf((ssm.C * ssm.dB).to(dtype), ssm.dA.to(dtype))
    torch.library.opcheck(torch.ops.hippo.diagonal_kernel, (cb, dA, 150))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_chunk_matrices(dtype):
    sB, sC, sD, ssm, D = _ssm(3, dtype)
    torch.library.opcheck(torch.ops.hippo.shift_mats, (*_leaf(sB, sC, sD), P))
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    torch.library.opcheck(torch.ops.hippo.diag_mats, (*_leaf(*(t.to(cdtype) for t in ssm), D), P, dtype))


def _block_inputs(dtype, B=2, C=3, L=200, x0=False, seed=0):
    """hippo::h3_blocks' inputs for a small core: q, k, v, the chunk matrices, x0."""
    sB, sC, sD, ssm, D = _ssm(C, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(B, C, L, generator=g, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        mats = (ops.shift_mats(sB, sC, sD, P), *ops.diag_mats(*ssm, D, P, dtype))
    init = torch.randn(C, B, 32, generator=g, dtype=mats[-1].dtype) if x0 else None
    return [q, k, v, *mats], init


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("documents", [False, True])
def test_opcheck_h3_blocks(dtype, documents):
    L = 200
    tensors, x0 = _block_inputs(dtype, L=L, x0=documents)
    ds = _starts(2, L, (0, 70), (1, 130), (1, 131)) if documents else None
    T = 128  # two blocks: the block boundary's halo and state carry are exercised
    args = (*_leaf(*tensors), *(_leaf(x0) if x0 is not None else [None]), T, ds, True)
    torch.library.opcheck(torch.ops.hippo.h3_blocks, args)


def test_opcheck_h3_blocks_backward():
    """The backward op alone (schema, fake tensors); its gradients are checked through h3_blocks."""
    L, T = 200, 128
    tensors, x0 = _block_inputs(torch.float32, L=L, x0=True)
    ds = _starts(2, L, (0, 70))
    y, before_last, kv_last, _, _, saved = torch.ops.hippo.h3_blocks(*tensors, x0, T, ds, True)
    grads = (torch.randn_like(y), torch.randn_like(before_last), torch.randn_like(kv_last))
    args = (*grads, *tensors, x0, T, ds, saved, [True] * 9)
    torch.library.opcheck(torch.ops.hippo.h3_blocks_backward, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- bit for bit
def _run_both(fn):
    """fn() through the ops and through the Functions (`ops.direct()`): two lists of tensors."""
    with ops.always():
        routed = fn()
    with ops.direct():
        direct = fn()
    return routed, direct


def _assert_identical(routed, direct):
    assert len(routed) == len(direct)
    for i, (a, b) in enumerate(zip(routed, direct)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"output {i} differs: max {(a - b).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("state, documents", [(False, False), (True, False), (True, True), (False, True)])
def test_h3_core_through_ops_is_bit_identical(dtype, impl, state, documents):
    B, C, L = 2, 3, 200
    sB, sC, sD, ssm, D = _ssm(C, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, C, L, generator=g, dtype=dtype) for _ in range(3))
    x0 = torch.randn(B, C, 32, generator=g, dtype=ssm.dA.dtype) if state else None
    ds = _starts(B, L, (0, 70), (1, 130)) if documents else None
    w = torch.linspace(-1, 1, L, dtype=dtype)

    def run():
        leaves = _leaf(q, k, v, sB, sC, sD, D, ssm.dA, ssm.dB, ssm.C, *([x0] if state else []))
        disc = type(ssm)(*leaves[7:10])
        out = h3_core(*leaves[:6], disc, leaves[6], impl=impl, initial_state=leaves[10] if state else None,
                      return_state=state, doc_start=ds)
        y, fin = out if state else (out, None)
        loss = (y * w).sum() + (fin.abs().square().sum() if state else 0)
        return [y, *([fin] if state else []), *torch.autograd.grad(loss, leaves)]

    _assert_identical(*_run_both(run))


def test_no_grad_and_s4d_paths_are_bit_identical():
    """Inference (save=False), diagonal_conv (S4D with documents), fftconv and the diagonal kernel."""
    B, C, L = 2, 3, 150
    sB, sC, sD, ssm, D = _ssm(C, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(B, C, L, generator=g) for _ in range(3))
    ds = _starts(B, L, (1, 40))

    def run():
        with torch.no_grad():
            y = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="torch", doc_start=ds)
        x, Dl, dA, dB, Cm = _leaf(k, D, ssm.dA, ssm.dB, ssm.C)
        disc = type(ssm)(dA, dB, Cm)
        s4d = diagonal_conv(x, disc, Dl, doc_start=ds)
        conv = fftconv(x, diagonal_kernel(disc, L), Dl)
        grads = torch.autograd.grad((s4d.sum(), (conv * conv).sum()), (x, Dl, dA, dB, Cm))
        return [y, s4d, conv, *grads]

    _assert_identical(*_run_both(run))


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.compile
@pytest.mark.timeout(600)
def test_compiled_h3_layer_matches_eager_with_no_graph_break():
    """An H3 layer (chunked core, with and without documents) compiled with fullgraph=True: no
    graph break; through AOTAutograd alone (aot_eager) bit for bit eager's outputs and gradients,
    through inductor within 1e-5 normwise relative (its fused reductions reassociate sums)."""
    from hippo.pretrain.models.h3 import H3

    torch.manual_seed(0)
    layer = H3(32, layer_idx=0, conv_impl="chunked")
    u, w = torch.randn(2, 96, 32), torch.randn(2, 96, 32)
    ds = _starts(2, 96, (1, 50))

    def step(module, starts):
        x = u.detach().requires_grad_()
        module.zero_grad(set_to_none=True)
        y = module(x, doc_start=starts)
        (y * w).sum().backward()
        return [y, x.grad, *(p.grad for p in module.parameters())]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(u, doc_start=ds)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    for backend in ("aot_eager", "inductor"):
        compiled = torch.compile(layer, fullgraph=True, backend=backend)
        for starts in (None, ds):
            eager, got = step(layer, starts), step(compiled, starts)
            if backend == "aot_eager":
                _assert_identical(got, eager)
            for a, b in zip(got, eager):
                assert ((a - b).norm() / b.norm()).item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_decode_steps_and_bit_identity(dtype):
    """The in-place decode steps: opcheck (their state declared mutated), and a few tokens through
    the ops equal to the plain functions, outputs and states."""
    from hippo.kernels.ssm import (
        diagonal_decode_state,
        diagonal_decode_step,
        diagonal_decoder,
        shift_ring_step,
        shift_ring_taps,
    )

    B, C, N = 2, 3, 8
    sB, sC, sD, ssm, D = _ssm(C, dtype, seed=7)
    taps = shift_ring_taps(sB[:, :N], sC[:, :N], sD)
    dec = diagonal_decoder(ssm, D)
    g = torch.Generator().manual_seed(8)
    xs = torch.randn(5, B, C, generator=g, dtype=dtype)
    state0 = diagonal_decode_state(torch.randn(B, C, 32, generator=g, dtype=ssm.dA.dtype), ssm)
    torch.library.opcheck(torch.ops.hippo.shift_ring_step, (torch.zeros(C, N, B, dtype=dtype), taps, xs[0], 3))
    torch.library.opcheck(torch.ops.hippo.diagonal_decode_step, (state0.clone(), *dec, xs[0]))

    def run():
        window, s, outs = torch.zeros(C, N, B, dtype=dtype), state0.clone(), []
        for t, x in enumerate(xs):
            k = shift_ring_step(window, taps, x, t)
            outs.append(diagonal_decode_step(s, dec, k * x))
        return [*outs, window, s]

    _assert_identical(*_run_both(run))
