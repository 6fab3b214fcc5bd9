"""Packed documents in the SSM paths (issue 25): h3_core's "reference" and "torch" paths, the
diagonal SSM alone (S4D), the H3 and S4D layers, prefill and decode, each against a float64
oracle that runs every document alone (direct O(L^2) convolutions) and puts the outputs back."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from hippo.kernels import (
    TritonUnavailableError,
    diagonal_conv,
    diagonal_kernel,
    discretize_diagonal,
    fftconv_ref,
    h3_core,
    select_impl,
)
from hippo.kernels import documents
from hippo.kernels.documents import document_spans
from hippo.kernels.h3_core import _h3_core_chunked, triton_unsupported
from hippo.pretrain.models.config import ConfigError
from hippo.pretrain.models.h3 import H3
from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.s4d import S4D
from tests.kernels.test_h3_core import _c128, _oracle, _params, _rel


def _starts(B: int, L: int, rows: list[list[int]]) -> torch.Tensor:
    ds = torch.zeros(B, L, dtype=torch.bool)
    for b, row in enumerate(rows):
        ds[b, row] = True
    return ds


# Starts at 0, 1, 63, 64, 65, on chunk (64) and block (128) edges, two in a row, L - 1; rows differ.
L_EDGE = 300
EDGE_ROWS = [[1, 63, 64, 65, 128, 129, 200, 201, L_EDGE - 1], [0, 5, 70, 190, 256]]


def _separate(q, k, v, sB, sC, sD, ssm, D, ds, x0=None):
    """Every document of every row alone through the float64 oracle, concatenated."""
    ssm64 = _c128(ssm)
    rows = []
    for b in range(q.shape[0]):
        parts = []
        for s, e in document_spans(ds[b]):
            init = x0[b : b + 1] if x0 is not None and s == 0 and not ds[b, 0] else None
            y, _ = _oracle(q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], sB, sC, sD, ssm64, D, init)
            parts.append(y)
        rows.append(torch.cat(parts, -1))
    return torch.cat(rows)


def _inputs(B, C, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, C, L, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _run(impl, q, k, v, sB, sC, sD, raw, D, ds, block=None, **kw):
    ssm = discretize_diagonal(*raw)
    if block is not None:
        return _h3_core_chunked(q, k, v, sB, sC, sD, ssm, D, kw.get("initial_state"), kw.get("return_state", False),
                                block=block, doc_start=ds)
    return h3_core(q, k, v, sB, sC, sD, ssm, D, impl=impl, doc_start=ds, **kw)


@pytest.mark.parametrize("impl,block", [("reference", None), ("torch", None), ("torch", 128), ("torch", 64)])
def test_packed_equals_separate_float64(impl, block):
    B, C, L = 2, 3, L_EDGE
    sB, sC, sD, raw, D = _params(C, torch.float64)
    q, k, v = _inputs(B, C, L, torch.float64)
    ds = _starts(B, L, EDGE_ROWS)
    want = _separate(q, k, v, sB, sC, sD, discretize_diagonal(*raw), D, ds)
    assert _rel(_run(impl, q, k, v, sB, sC, sD, raw, D, ds, block), want) < 1e-12


def test_packed_equals_separate_with_initial_and_final_state():
    """The initial state reaches only a row's first document (a start at 0 drops it); the
    returned state is the last document's: both paths agree with each other and the oracle."""
    B, C, L = 2, 3, 200
    sB, sC, sD, raw, D = _params(C, torch.float64)
    q, k, v = _inputs(B, C, L, torch.float64)
    ds = _starts(B, L, [[70, 130], [0, 199]])
    x0 = torch.randn(B, C, 32, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    want = _separate(q, k, v, sB, sC, sD, discretize_diagonal(*raw), D, ds, x0)
    out = {impl: _run(impl, q, k, v, sB, sC, sD, raw, D, ds, initial_state=x0, return_state=True)
           for impl in ("reference", "torch")}
    for y, _ in out.values():
        assert _rel(y, want) < 1e-12
    s_ref, s_torch = out["reference"][1], out["torch"][1]
    assert _rel(torch.view_as_real(s_torch), torch.view_as_real(s_ref)) < 1e-12
    # The last document alone gives that state.
    ssm = discretize_diagonal(*raw)
    _, alone = h3_core(q[:1, :, 130:], k[:1, :, 130:], v[:1, :, 130:], sB, sC, sD, ssm, D, impl="reference",
                       return_state=True)
    assert _rel(torch.view_as_real(s_torch[:1]), torch.view_as_real(alone)) < 1e-12


@pytest.fixture(params=["ride", "halves"])
def correction_mode(request, monkeypatch):
    """Both ways the chunked path corrects in-chunk starts (`kernels.h3_core._cross_starts`):
    riding in the block's products, or half products; the density threshold forced each way."""
    monkeypatch.setattr(documents, "HALVES_MIN_STARTS_PER_ROW", float("inf") if request.param == "ride" else 0.0)
    monkeypatch.setattr(documents, "_last_plan", None)
    return request.param


@pytest.mark.parametrize("block", [None, 128, 64])
def test_gradients_equal_the_reference_paths(block, correction_mode):
    """Backward of the chunked path (hand-written) against autograd through the per-document
    reference, for every input and parameter, with the final state in the loss."""
    B, C, L = 2, 3, L_EDGE
    sB, sC, sD, raw, D = _params(C, torch.float64)
    params = [sB, sC, sD, D, *raw]
    for t in params:
        t.requires_grad_()
    q, k, v = _inputs(B, C, L, torch.float64)
    ds = _starts(B, L, EDGE_ROWS)
    w = torch.randn(B, C, L, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(impl, blk):
        y, state = _run(impl, q, k, v, sB, sC, sD, raw, D, ds, blk, return_state=True)
        loss = (y * w).sum() + (state.abs() ** 2).sum()
        return torch.autograd.grad(loss, [q, k, v, *params])

    for got, want in zip(grads("torch", block), grads("reference", None)):
        assert _rel(got, want) < 1e-11


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_no_leakage_from_an_earlier_document(impl, dtype, tol):
    """Changing every input of document A (and of the documents before it) leaves document B's
    outputs and the parameter gradients of a loss on B unchanged."""
    B, C, L = 2, 4, 256
    sB, sC, sD, raw, D = _params(C, dtype)
    params = [sB, sC, sD, D, *raw]
    for t in params:
        t.requires_grad_()
    ds = _starts(B, L, [[64, 129], [1, 2, 191]])
    b_start = [129, 191]

    def with_b_from(seed_a, seed_b):
        # Inputs of document B from seed_b, everything before it from seed_a.
        qa, ka, va = _inputs(B, C, L, dtype, seed_a)
        qb, kb, vb = _inputs(B, C, L, dtype, seed_b)
        out = []
        for a, bb in ((qa, qb), (ka, kb), (va, vb)):
            t = a.detach().clone()
            for b, s in enumerate(b_start):
                t[b, :, s:] = bb.detach()[b, :, s:]
            out.append(t.requires_grad_())
        return out

    results = []
    for seed_a in (1, 2):
        q, k, v = with_b_from(seed_a, 9)
        y = _run(impl, q, k, v, sB, sC, sD, raw, D, ds)
        mask = torch.zeros(B, 1, L, dtype=dtype)
        for b, s in enumerate(b_start):
            mask[b, :, s:] = 1
        grads = torch.autograd.grad((y * mask).square().sum(), params)
        results.append((y * mask, grads))
    (y1, g1), (y2, g2) = results
    assert _rel(y2, y1) < tol
    for a, b in zip(g2, g1):
        assert _rel(a, b) < tol
    # Without isolation document A does reach B (the test can see a leak).
    q, k, v = with_b_from(1, 9)
    q2, k2, v2 = with_b_from(2, 9)
    ssm = discretize_diagonal(*raw)
    plain = [h3_core(*t, sB, sC, sD, ssm, D, impl=impl)[..., 129:] for t in ((q, k, v), (q2, k2, v2))]
    assert _rel(plain[1][0], plain[0][0]) > 1e-3


def test_diagonal_conv_isolates_documents():
    """S4D's convolution with documents: each document alone through the direct convolution."""
    B, C, L = 2, 3, 300
    _, _, _, raw, D = _params(C, torch.float64)
    ssm = discretize_diagonal(*raw)
    x = torch.randn(B, C, L, dtype=torch.float64)
    ds = _starts(B, L, EDGE_ROWS)
    want = torch.cat([
        torch.cat([fftconv_ref(x[b : b + 1, :, s:e], diagonal_kernel(_c128(ssm), e - s), D)
                   for s, e in document_spans(ds[b])], -1)
        for b in range(B)
    ])
    assert _rel(diagonal_conv(x, ssm, D, doc_start=ds), want) < 1e-12


def test_no_starts_and_none_are_the_plain_path():
    B, C, L = 2, 3, 130
    sB, sC, sD, raw, D = _params(C)
    q, k, v = _inputs(B, C, L, torch.float32)
    ssm = discretize_diagonal(*raw)
    plain = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="torch")
    empty = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="torch", doc_start=torch.zeros(B, L, dtype=torch.bool))
    assert torch.equal(plain, empty)


def test_one_plan_per_map_shared_by_the_layers_of_a_forward(monkeypatch):
    """The layers of a forward take one map: its ChunkPlan is built once and reused, while a map
    changed in place or another map builds its own (and each output is still the reference's)."""
    from hippo.kernels import documents

    built = []

    class Counted(documents.ChunkPlan):
        def __init__(self, *args):
            built.append(args[0])
            super().__init__(*args)

    monkeypatch.setattr(documents, "ChunkPlan", Counted)
    monkeypatch.setattr(documents, "_last_plan", None)
    B, C, L = 2, 2, 200
    sB, sC, sD, raw, D = _params(C, torch.float64)
    q, k, v = _inputs(B, C, L, torch.float64)
    ds = _starts(B, L, [[3, 64, 130], [70]])

    def check():
        ssm = discretize_diagonal(*raw)
        got = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="torch", doc_start=ds)
        assert _rel(got, h3_core(q, k, v, sB, sC, sD, ssm, D, impl="reference", doc_start=ds)) < 1e-10

    for _ in range(3):  # three layers, one map
        check()
    assert len(built) == 1
    ds[1, 10] = True  # the same tensor, changed
    check()
    ds = ds.clone()  # another tensor
    check()
    assert len(built) == 3


def test_bad_doc_start_names_the_argument():
    sB, sC, sD, raw, D = _params(2)
    q, k, v = _inputs(1, 2, 10, torch.float32)
    with pytest.raises(ValueError, match="doc_start must be a \\(1, 10\\) bool"):
        h3_core(q, k, v, sB, sC, sD, discretize_diagonal(*raw), D, impl="torch", doc_start=torch.zeros(1, 9).bool())


# ------------------------------------------------------------------ Triton: the reason, not a crash
def test_triton_cannot_take_documents_and_says_why():
    assert triton_unsupported((9, 0), torch.bfloat16, 1024, "cuda", documents=True).startswith("per-document")
    assert select_impl((9, 0), torch.bfloat16, 1024, "cuda", documents=True) == "torch"
    with pytest.raises(TritonUnavailableError, match="doc_start"):
        select_impl((9, 0), torch.bfloat16, 1024, "cuda", impl="triton", documents=True)
    with pytest.raises(TritonUnavailableError, match="doc_start"):
        select_impl(None, torch.float32, 1024, "cpu", impl="triton", interpret=True, documents=True)


def test_explicit_triton_with_documents_raises_before_any_work(monkeypatch):
    """Under the interpreter (where Triton could otherwise run on CPU) and in the H3 layer, which
    names its option."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sB, sC, sD, raw, D = _params(2)
    q, k, v = _inputs(1, 2, 10, torch.float32)
    ds = _starts(1, 10, [[4]])
    with pytest.raises(TritonUnavailableError, match="doc_start"):
        h3_core(q, k, v, sB, sC, sD, discretize_diagonal(*raw), D, impl="triton", doc_start=ds)
    layer = H3(4, 16, layer_idx=0, conv_impl="triton")
    with pytest.raises(ConfigError, match="model.conv_impl='triton' cannot run here: .*doc_start"):
        layer(torch.randn(1, 10, 4), doc_start=ds)


def test_auto_logs_the_documents_fallback_once(caplog, monkeypatch):
    """Where Triton would run (an sm_90 device, triton installed), documents send "auto" to the
    chunked path, and the reason is logged once; the plain call still picks Triton."""
    mod = sys.modules["hippo.kernels.h3_core"]
    mod._auto_logged.clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(mod.importlib.util, "find_spec", lambda name: object())
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="hippo.kernels.h3_core"):
        for _ in range(2):
            assert mod._resolve_impl("auto", cuda, torch.bfloat16, 1024, False, documents=True) == "torch"
        assert mod._resolve_impl("auto", cuda, torch.bfloat16, 1024, False) == "triton"
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("picked 'torch'" in m and "doc_start" in m for m in msgs) == 1, msgs
    assert sum("picked 'triton'" in m for m in msgs) == 1, msgs
    mod._auto_logged.clear()


# ------------------------------------------------------------------ layers: packed == separate
def _layer(kind, d=8, impl="chunked", dtype=torch.float64):
    torch.manual_seed(0)
    if kind == "h3":
        return H3(d, 16, layer_idx=0, conv_impl=impl).to(dtype)
    return S4D(d, 16, layer_idx=0).to(dtype)


@pytest.mark.parametrize("kind,impl", [("h3", "chunked"), ("h3", "reference"), ("s4d", None)])
def test_layer_packed_equals_separate_forward_and_backward(kind, impl):
    layer = _layer(kind, impl=impl or "chunked")
    B, L, d = 2, 150, 8
    ds = _starts(B, L, [[1, 64, 65, 149], [0, 63, 100, 101]])
    u = torch.randn(B, L, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, L, d, dtype=torch.float64)
    y = layer(u, doc_start=ds)
    params = list(layer.parameters())
    g = torch.autograd.grad((y * w).sum(), [u, *params])
    want_y = torch.zeros_like(y)
    want_g = [torch.zeros_like(t) for t in (u, *params)]
    for b in range(B):
        for s, e in document_spans(ds[b]):
            piece = u[b : b + 1, s:e].detach().requires_grad_()
            out = layer(piece)
            want_y[b, s:e] = out[0].detach()
            gs = torch.autograd.grad((out * w[b : b + 1, s:e]).sum(), [piece, *params])
            want_g[0][b, s:e] = gs[0][0]
            for acc, gi in zip(want_g[1:], gs[1:]):
                acc += gi
    # 1e-6: the layers run the SSM parameters in fp32 (`H3._core`), whatever the activations.
    assert _rel(y, want_y) < 1e-6
    for got, want in zip(g, want_g):
        assert _rel(got, want) < 1e-6


# ------------------------------------------------------------------ prefill and decode
@pytest.mark.parametrize("kind", ["h3", "s4d"])
def test_prefill_with_documents_then_steps_equal_the_last_document_alone(kind):
    layer = _layer(kind, dtype=torch.float32)  # decode states are fp32
    d = 8
    prompt = torch.randn(2, 90, d, dtype=torch.float32)
    nxt = torch.randn(2, 5, d, dtype=torch.float32)
    ds = _starts(2, 90, [[30, 70], [89]])
    last = [70, 89]

    def generate(u, starts, offset0):
        ip = InferenceParams(max_seqlen=200, max_batch_size=u.shape[0])
        outs = [layer(u, ip, doc_start=starts)[:, -1]]
        ip.seqlen_offset = u.shape[1]
        for t in range(nxt.shape[1]):
            outs.append(layer(nxt[:, t : t + 1], ip)[:, 0])
            ip.seqlen_offset += 1
        return torch.stack(outs, 1)

    got = generate(prompt, ds, 0)
    for b, s in enumerate(last):
        ip = InferenceParams(max_seqlen=200, max_batch_size=1)
        outs = [layer(prompt[b : b + 1, s:], ip)[:, -1]]
        ip.seqlen_offset = 90 - s
        for t in range(nxt.shape[1]):
            outs.append(layer(nxt[b : b + 1, t : t + 1], ip)[:, 0])
            ip.seqlen_offset += 1
        assert _rel(got[b], torch.stack(outs, 1)[0]) < 1e-5


@pytest.mark.parametrize("kind", ["h3", "s4d"])
def test_decode_after_a_reset_equals_a_fresh_start(kind):
    """Row 0's token after an EOS (`doc_reset`) and the ones after it give what a fresh
    prefill of that token and the same steps give; row 1 (no reset) is unchanged."""
    layer = _layer(kind, dtype=torch.float32)  # decode states are fp32
    d = 8
    prompt = torch.randn(2, 40, d, dtype=torch.float32)
    toks = torch.randn(2, 6, d, dtype=torch.float32)
    ip = InferenceParams(max_seqlen=100, max_batch_size=2)
    layer(prompt, ip)
    ip.seqlen_offset = 40
    ref_ip = InferenceParams(max_seqlen=100, max_batch_size=2)
    layer(prompt, ref_ip)
    ref_ip.seqlen_offset = 40
    got, plain = [], []
    for t in range(toks.shape[1]):
        ip.doc_reset = torch.tensor([t == 0, False])
        got.append(layer(toks[:, t : t + 1], ip)[:, 0])
        plain.append(layer(toks[:, t : t + 1], ref_ip)[:, 0])
        ip.seqlen_offset += 1
        ref_ip.seqlen_offset += 1
    got, plain = torch.stack(got, 1), torch.stack(plain, 1)
    fresh = InferenceParams(max_seqlen=100, max_batch_size=1)
    outs = [layer(toks[:1, :1], fresh)[:, -1]]
    fresh.seqlen_offset = 1
    for t in range(1, toks.shape[1]):
        outs.append(layer(toks[:1, t : t + 1], fresh)[:, 0])
        fresh.seqlen_offset += 1
    assert _rel(got[0], torch.stack(outs, 1)[0]) < 1e-5
    assert torch.equal(got[1], plain[1])
    assert _rel(got[0], plain[0]) > 1e-3  # without the reset the prompt would still be heard


@pytest.mark.slow  # 8 cases of 3-13 s: the edge-row gradient test covers both modes in the fast tier
@pytest.mark.parametrize("seed,density", [(0, 0.002), (1, 0.02), (2, 0.2), (3, 0.6)])
def test_random_maps_chunked_equals_per_document_reference(seed, density, correction_mode):
    """Random lengths and start maps from sparse to most positions, with an initial state and
    the final state in the loss, blocks of one chunk (every start near a block edge) and whole:
    the chunked path's outputs, state and every gradient equal the per-document reference's."""
    g = torch.Generator().manual_seed(seed)
    B, C, L = 3, 2, int(torch.randint(1, 600, (1,), generator=g))
    ds = torch.rand(B, L, generator=g) < density
    sB, sC, sD, raw, D = _params(C, torch.float64, seed=seed)
    params = [sB, sC, sD, D, *raw]
    for t in params:
        t.requires_grad_()
    q, k, v = (torch.randn(B, C, L, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x0 = torch.randn(B, C, 32, dtype=torch.complex128, generator=g)
    w = torch.randn(B, C, L, dtype=torch.float64, generator=g)

    def run(impl, block=None):
        y, state = _run(impl, q, k, v, sB, sC, sD, raw, D, ds, block, initial_state=x0, return_state=True)
        grads = torch.autograd.grad((y * w).sum() + (state.abs() ** 2).sum(), [q, k, v, *params])
        return [y, torch.view_as_real(state), *grads]

    want = run("reference")
    for block in (64, None):
        for got, ref in zip(run("torch", block), want):
            assert _rel(got, ref) < 1e-10
