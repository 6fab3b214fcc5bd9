"""h3_core(impl="torch") in blocks of bounded B x L, both SSM states carried between blocks.

The shift SSM's state crosses a block boundary as the halo (the P inputs before the block), the
diagonal SSM's as its N/2 complex modes; backward walks the blocks in reverse and carries both
gradients back. Outputs, the final state and every gradient are held to float64 references for
L shorter than one block, L not a multiple of the block, and L spanning many blocks.
"""

import sys

import pytest
import torch

from hippo.kernels import (
    DiscreteDiagonalSSM,
    diagonal_kernel,
    discretize_diagonal,
    fftconv_ref,
    h3_core_ref,
    shift_kernel,
)
from hippo.kernels.h3_core import (
    _BLOCK_ELEMS,
    _CHUNK,
    _MIN_BLOCK,
    _BlockedH3,
    _DiagMats,
    _h3_core_chunked,
    _ShiftMats,
    _spans,
    block_length,
)
from tests.kernels.test_h3_core import _params as core_params


def _params(C, dtype, seed):
    """test_h3_core's parameters as one flat list (shift B, C, D, the diagonal SSM's five, D)."""
    sB, sC, sD, diag, D = core_params(C, dtype, seed)
    return [sB, sC, sD, *diag, D]


def _inputs(Bsz, C, L, dtype, seed, layout):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, Bsz, C, L, generator=g, dtype=dtype).unbind(0)
    if layout == "projection":  # the layer's transposed (B, L, C) projections
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    x0 = torch.randn(Bsz, C, 32, generator=g, dtype=torch.complex128)
    w = torch.randn(Bsz, C, L, generator=g, dtype=torch.float64)
    w_state = torch.randn(Bsz, C, 32, generator=g, dtype=torch.complex128)
    return [q, k, v, x0.to(dtype.to_complex())], w, w_state


def _run(impl, tensors, params, w, w_state, block=None):
    """y, final state and d(loss)/d(every input and raw parameter)."""
    leaves = [t.clone().requires_grad_() for t in (*tensors, *params)]
    q, k, v, x0, sB, sC, sD, *raw, D = leaves
    ssm = discretize_diagonal(*raw)
    if impl == "reference":
        y, st = h3_core_ref(q, k, v, sB, sC, sD, ssm, D, initial_state=x0, return_state=True)
    else:
        y, st = _h3_core_chunked(q, k, v, sB, sC, sD, ssm, D, x0, True, block=block)
    loss = (y * w.to(y.dtype)).sum() + (st * w_state.to(st.dtype).conj()).real.sum()
    return y.detach(), st.detach(), torch.autograd.grad(loss, leaves)


def _rel(a, b):
    return ((a.to(torch.complex128) - b.to(torch.complex128)).abs().norm() / b.abs().norm()).item()


# (L, T): shorter than one block, a partial last block (L not a multiple of T nor of P),
# exactly two blocks, many blocks (16) with a partial last chunk.
CASES = [(37, 256), (300, 128), (256, 128), (1000, 64)]


@pytest.mark.parametrize("layout", ["contiguous", "projection"])
@pytest.mark.parametrize("L,T", CASES)
def test_blocks_float64_exact(L, T, layout):
    """float64: outputs, final state and all 13 gradients == the full-length reference."""
    tensors, w, ws = _inputs(2, 3, L, torch.float64, L + T, layout)
    params = _params(3, torch.float64, L)
    y, st, grads = _run("torch", tensors, params, w, ws, block=T)
    y_ref, st_ref, grads_ref = _run("reference", tensors, params, w, ws)
    assert len(_spans(L, T, _CHUNK)) == -(-L // T)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(st, st_ref, rtol=1e-9, atol=1e-11)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def _oracle(tensors, params):
    """float64 direct O(L^2) convolutions (independent of both FFT and chunking)."""
    q, k, v, x0 = (t.detach().to(torch.complex128 if t.is_complex() else torch.float64) for t in tensors)
    sB, sC, sD, *raw, D = (t.double() for t in params)
    ssm = DiscreteDiagonalSSM(*(t.to(torch.complex128) for t in discretize_diagonal(*raw)))
    L = q.shape[-1]
    kv = fftconv_ref(k, shift_kernel(sB, sC, min(L, 64)), sD) * v
    s = fftconv_ref(kv, diagonal_kernel(ssm, L), D)
    powers = ssm.dA.unsqueeze(-1) ** torch.arange(1, L + 1, dtype=torch.float64)  # (C, N/2, L)
    s = s + 2 * torch.einsum("bcn,cnl->bcl", x0 * ssm.C, powers).real
    return q * s


@pytest.mark.parametrize("L,T", CASES)
def test_blocks_float32_against_direct_oracle(L, T):
    """fp32 fast path in the layer's layout: y vs the float64 direct convolution at the
    tolerance of tests/kernels/test_h3_core.py (no initial state there, as in that test), then the
    final state and all gradients, with an initial state, vs float64."""
    tensors, w, ws = _inputs(2, 3, L, torch.float32, 7 * L + T, "projection")
    params = _params(3, torch.float32, L + 1)
    no_x0 = [*tensors[:3], torch.zeros_like(tensors[3])]
    y, _, _ = _run("torch", no_x0, params, w, ws, block=T)
    assert y.dtype == torch.float32 and y.stride() == tensors[0].stride()
    assert _rel(y, _oracle(no_x0, params)) <= 1e-5
    y, st, grads = _run("torch", tensors, params, w, ws, block=T)
    t64 = [t.to(torch.complex128 if t.is_complex() else torch.float64) for t in tensors]
    y64, st64, grads64 = _run("reference", t64, [t.double() for t in params], w, ws)
    # fp32 rounding of a long sum: the single-pass path before blocking measured the same
    # (2.4e-5 at L = 300 here, to three digits), so the bound is the reference path's 1e-4.
    assert ((st - st64).abs().max() / st64.abs().max()).item() <= 1e-4
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.to(g64.dtype), g64, rtol=2e-4, atol=2e-4 * g64.abs().max().item())


def test_default_blocks_span_long_sequences(monkeypatch):
    """With the default block length (bounded C x B x T), a long L runs as several blocks and
    still equals the reference; no per-call tensor of the blocks exceeds the bound."""
    mod = sys.modules["hippo.kernels.h3_core"]  # the module (the package exports h3_core, the function)
    monkeypatch.setattr(mod, "_BLOCK_ELEMS", 8 * 2 * 320)  # T = 320 for C 8 x B 2
    C, Bsz, L = 8, 2, 1500
    T = mod.block_length(C, Bsz, L)
    assert T == 320 and len(_spans(L, T, _CHUNK)) == 5
    tensors, w, ws = _inputs(Bsz, C, L, torch.float64, 11, "projection")
    params = _params(C, torch.float64, 12)
    seen = []
    real_forward = mod._blocked_forward

    def spy(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        seen.extend(t.numel() for blk in out[3] for t in blk)
        return out

    monkeypatch.setattr(mod, "_blocked_forward", spy)
    y, st, grads = _run("torch", tensors, params, w, ws)
    y_ref, st_ref, grads_ref = _run("reference", tensors, params, w, ws)
    assert seen and max(seen) <= C * Bsz * (T + _CHUNK)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-11)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_block_length_bounds():
    for C, Bsz, L in [(256, 4, 65536), (256, 4, 1000), (2560, 8, 4096), (3, 2, 10), (64, 1, 1 << 20)]:
        T = block_length(C, Bsz, L)
        assert T % _CHUNK == 0 and T <= -(-L // _CHUNK) * _CHUNK
        assert C * Bsz * T <= _BLOCK_ELEMS or T == _MIN_BLOCK or T >= L
    assert block_length(256, 4, 65536) == 1024


def test_block_functions_gradcheck():
    """The hand-written backwards of the blocked core and of the per-call matrices."""
    g = torch.Generator().manual_seed(3)
    C, Bsz, L, P = 2, 2, 150, _CHUNK
    q, k, v = (torch.randn(Bsz, C, L, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    mats = [torch.randn(C, P, 2 * P), torch.randn(C, P, P), torch.randn(C, P, 64), torch.randn(C, 64, P)]
    mats = [(m.double() / 8).requires_grad_() for m in mats]
    decay = (0.9 * torch.randn(C, 32, generator=g, dtype=torch.complex128)).requires_grad_()
    x0 = torch.randn(C, Bsz, 32, generator=g, dtype=torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _BlockedH3.apply(*a, 64), (q, k, v, *mats, decay, x0), fast_mode=True)

    raw = _params(C, torch.float64, 5)
    ssm = discretize_diagonal(*(t.requires_grad_() for t in raw[3:8]))
    dA, dB, Cm = (t.detach().requires_grad_() for t in ssm)
    D = raw[8].requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _DiagMats.apply(*a, P, torch.float64), (dA, dB, Cm, D), fast_mode=True)
    sB, sC, sD = (t.requires_grad_() for t in raw[:3])
    assert torch.autograd.gradcheck(lambda *a: _ShiftMats.apply(*a, P), (sB, sC, sD), fast_mode=True)
