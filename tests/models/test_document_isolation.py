"""Packed documents do not see each other (`model.document_isolation`): the model side.

References are independent of the masks under test: each document run alone in its own window
(packed equals separate), a float64 attention written out per document, and perturbing one
document while reading another's logits and gradients (no leakage). The H3 and S4D cases need the
mixers' half of the feature (their `doc_start` argument); until it is in the tree they are skipped
by name, not silently passed.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from hippo.pretrain.config import ConfigError
from hippo.pretrain.models import CausalSelfAttention, HippoLM, InferenceParams, ModelConfig
from hippo.pretrain.models.attention import blocked_same_document, flex_same_document, same_document_mask
from hippo.pretrain.models.documents import document_ids, document_starts, last_document_start
from hippo.pretrain.models.generation import generate
from hippo.pretrain.models.h3 import H3
from hippo.pretrain.models.s4d import S4D

EOS, V = 3, 40
BASE = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_state=8, document_isolation=True, eos_id=EOS)
MIXERS = {
    "attention": dict(mixer="attention"),
    "attention_rotary": dict(mixer="attention", position_embedding="rotary"),
    "h3": dict(mixer="h3"),
    "s4d": dict(mixer="s4d"),
    "hybrid": dict(mixer="h3", attn_layer_idx=[1]),
}


def _takes_doc_start(layer: type) -> bool:
    return "doc_start" in inspect.signature(layer.forward).parameters


_NEEDS = {"h3": H3, "s4d": S4D, "hybrid": H3}


def rel_tol(name: str) -> float:
    """Relative bound of a float64 comparison: 1e-9 for attention; the issue's float64 bar, 1e-6,
    where SSM layers take part, because they keep their parameters (and so the discretized
    dynamics) in fp32 whatever the activations: two exact computations of the same outputs (the
    FFT kernel vs the chunked path for S4D, or the recurrence vs the convolution while decoding)
    then agree only to fp32 rounding of the dynamics (measured: 2e-8 to 6e-9 relative)."""
    return 1e-9 if _NEEDS.get(name) is None else 1e-6


def mixer_params() -> list:
    """Every mixer; the SSM ones skipped while their layers lack `doc_start` (the kernels' half of
    issue 25, merged separately)."""
    out = []
    for name in MIXERS:
        layer = _NEEDS.get(name)
        marks = [] if layer is None or _takes_doc_start(layer) else [pytest.mark.skip(
            reason=f"{layer.__name__}.forward has no doc_start yet (issue 25's layer half)")]
        out.append(pytest.param(name, marks=marks))
    return out


def model(name: str, *, isolation: bool = True, dtype=torch.float64) -> HippoLM:
    cfg = ModelConfig(**{**BASE, **MIXERS[name], "document_isolation": isolation})
    return HippoLM(cfg, seed=7).to(dtype).eval()


# EOS at 0, 62, 63, 64 (three in a row) and L - 2: documents begin at 1, 63, 64, 65 and L - 1.
L = 130
EOS_AT = (0, 62, 63, 64, L - 2)


def window(seed: int, eos_at=EOS_AT, length: int = L) -> torch.Tensor:
    ids = torch.randint(EOS + 1, V, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, list(eos_at)] = EOS
    return ids


def documents(ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each document of a (1, L) window, from the EOS positions (the reference's own
    reading: an EOS ends its document)."""
    bounds, start = [], 0
    for t, tok in enumerate(ids[0].tolist()):
        if tok == EOS:
            bounds.append((start, t + 1))
            start = t + 1
    if start < ids.shape[1]:
        bounds.append((start, ids.shape[1]))
    return bounds


def test_document_starts_marks_the_token_after_each_eos():
    ids = torch.tensor([[EOS, 5, EOS, EOS, 6, 7, EOS]])
    assert document_starts(ids, EOS).tolist() == [[False, True, False, True, True, False, False]]
    # The token before the window (a context-parallel chunk's left neighbour) flags position 0.
    assert document_starts(ids[:, 1:], EOS, previous=ids[:, 0])[0, 0]
    assert not document_starts(ids[:, 2:], EOS, previous=ids[:, 1])[0, 0]
    starts = document_starts(ids, EOS)
    assert document_ids(starts).tolist() == [[0, 1, 1, 2, 3, 3, 3]]
    assert last_document_start(starts).tolist() == [4]
    assert last_document_start(torch.zeros(2, 5, dtype=torch.bool)).tolist() == [0, 0]


def direct_attention(layer: CausalSelfAttention, x: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    """float64, no rotary: softmax over the keys at or before each query that share its document id."""
    x = x.double()
    B, T, D = x.shape
    H, hd = layer.local_heads, layer.head_dim

    def heads(p: torch.nn.Linear) -> torch.Tensor:
        return (x @ p.weight.double().T + p.bias.double()).view(B, T, H, hd)

    q, k, v = heads(layer.q_proj), heads(layer.k_proj), heads(layer.v_proj)
    out = torch.zeros(B, T, H, hd, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            keys = [j for j in range(t + 1) if doc[b, j] == doc[b, t]]
            s = torch.einsum("hd,jhd->hj", q[b, t], k[b, keys]) / math.sqrt(hd)
            out[b, t] = torch.einsum("hj,jhd->hd", s.softmax(-1), v[b, keys])
    return out.reshape(B, T, D) @ layer.out_proj.weight.double().T + layer.out_proj.bias.double()


@pytest.mark.parametrize("eos_at", [((0, 1, 30, 31), (40, 68)), (tuple(range(0, 70, 2)), tuple(range(1, 70, 3)))],
                         ids=["documents", "many_tiny_documents"])
def test_attention_layer_matches_a_per_document_computation(eos_at):
    """Documents of a few dozen tokens (one causal call per document) and of 1-3 tokens (the
    blocked boolean mask)."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, layer_idx=0).double().eval()
    ids = torch.cat([window(1, length=70, eos_at=eos_at[0]), window(2, length=70, eos_at=eos_at[1])])
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    start = document_starts(ids, EOS)
    with torch.no_grad():
        got = layer(x, doc_start=start)
        plain = layer(x)
    expected = direct_attention(layer, x, document_ids(start))
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert (plain - expected).abs().max() > 1e-2 * expected.abs().max()  # the mask matters


@pytest.mark.parametrize("block", [16, 64, 512])
@pytest.mark.parametrize("queries", [200, 90])
def test_blocked_attention_equals_one_masked_call_forward_and_backward(block, queries):
    """The CPU path (blocks of queries over the keys from their documents' start, gradients summed
    in place) against one SDPA call with the whole mask, float64; `queries` < 200: the last queries
    of the keys, as a context-parallel rank sees the chunks before its own."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, queries, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 200, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ids = torch.cat([window(1, length=200, eos_at=(0, 15, 16, 63, 64, 150)), window(2, length=200, eos_at=(199,))])
    k_doc = document_ids(document_starts(ids, EOS))
    q_doc = k_doc[:, -queries:]
    grad = torch.randn(2, 3, queries, 8, generator=gen, dtype=torch.float64)
    got = blocked_same_document(q, k, v, q_doc, k_doc, block=block)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=same_document_mask(q_doc, k_doc))
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    assert (got - expected).abs().max() <= 1e-12
    for g, e in zip(got_grads, expected_grads):
        assert (g - e).abs().max() <= 1e-12


def test_attention_dropout_with_isolation_masks_in_one_call():
    """Attention dropout (training) takes the one-call path; a query's dropped-out output still
    comes from its own document only."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, layer_idx=0, dropout=0.5).double().train()
    ids = window(1, length=40, eos_at=(19,))
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    y = x.clone()
    y[:, :20] = torch.randn(1, 20, 32, dtype=torch.float64)  # document A changed
    start = document_starts(ids, EOS)
    torch.manual_seed(1)
    a = layer(x, doc_start=start)
    torch.manual_seed(1)
    b = layer(y, doc_start=start)
    assert (a[:, 20:] - b[:, 20:]).abs().max() <= 1e-12 and (a[:, :20] - b[:, :20]).abs().max() > 1e-3


@pytest.mark.parametrize("name", mixer_params())
def test_packed_documents_equal_separate_windows(name):
    """Each document's logits and its loss's parameter gradients, packed with others in one window,
    equal those of the document alone (float64, `rel_tol`)."""
    m = model(name)
    ids = window(3)
    weights = torch.randn(1, L, m.cfg.padded_vocab_size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    packed = m(ids)
    grads_packed = torch.autograd.grad((packed * weights).sum(), list(m.parameters()), allow_unused=True)
    separate = []
    grads_sep = [torch.zeros_like(p) for p in m.parameters()]
    for s, e in documents(ids):
        alone = m(ids[:, s:e])
        separate.append(alone)
        for acc, g in zip(grads_sep, torch.autograd.grad((alone * weights[:, s:e]).sum(), list(m.parameters()),
                                                          allow_unused=True)):
            if g is not None:
                acc += g
    separate = torch.cat(separate, 1)
    assert (packed - separate).abs().max() <= rel_tol(name) * separate.abs().max()
    scale = max(g.abs().max() for g in grads_sep)  # some gradients are zero by symmetry (key biases)
    for gp, gs in zip(grads_packed, grads_sep):
        gp = torch.zeros_like(gs) if gp is None else gp
        assert (gp - gs).abs().max() <= rel_tol(name) * scale


@pytest.mark.parametrize("name", mixer_params())
def test_changing_one_document_leaves_the_next_untouched(name):
    """Every token of document A (positions 1..62) changed: the logits of the documents after it
    and the parameter gradients of their loss stay the same; with isolation off they move."""
    ids = window(5)
    other = ids.clone()
    other[0, 1:62] = torch.randint(EOS + 1, V, (61,), generator=torch.Generator().manual_seed(6))
    after = slice(63, L)
    for isolation in (True, False):
        m = model(name, isolation=isolation)
        outs = []
        for x in (ids, other):
            logits = m(x)[:, after]
            grads = torch.autograd.grad(logits.square().mean(), list(m.parameters()), allow_unused=True)
            outs.append((logits, grads))
        (l1, g1), (l2, g2) = outs
        diff = (l1 - l2).abs().max() / l1.abs().max()
        if isolation:
            assert diff <= 1e-9
            scale = max(g.abs().max() for g in g1 if g is not None)
            for a, b in zip(g1, g2):
                if a is not None:
                    assert (a - b).abs().max() <= 1e-9 * scale
        else:
            assert diff > 1e-4  # without isolation document A leaks into what follows


def _teacher_forced(m: HippoLM, prompt: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """Logits after the prompt and after each token of `fed`, one decode step each: (B, 1 + n, V)."""
    params = InferenceParams(max_seqlen=prompt.shape[1] + fed.shape[1], max_batch_size=prompt.shape[0])
    out = [m(prompt, params)[:, -1:]]
    for i in range(fed.shape[1]):
        params.seqlen_offset = prompt.shape[1] + i
        out.append(m(fed[:, i : i + 1], params))
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", mixer_params())
@torch.no_grad()
def test_generation_after_an_eos_equals_generation_from_a_fresh_prompt(name):
    """Recurrent mode, both ways a document can end: an EOS inside the prompt (prefill) and an EOS
    fed during decoding (`doc_reset`). Batch rows differ in where (and whether) they reset."""
    m = model(name)
    a, b = window(8, eos_at=(), length=20), window(9, eos_at=(), length=12)
    eos = torch.tensor([[EOS]])
    # EOS in the prompt: [a, EOS, b[:5]] continues exactly like [b[:5]].
    packed = generate(m, torch.cat([a, eos, b[:, :5]], 1), 10)
    fresh = generate(m, b[:, :5], 10)
    assert torch.equal(packed[:, -10:], fresh[:, -10:])
    ref = _teacher_forced(m, b[:, :1], b[:, 1:])
    got = _teacher_forced(m, torch.cat([a, eos, b[:, :1]], 1), b[:, 1:])
    assert (got - ref).abs().max() <= rel_tol(name) * ref.abs().max()
    # EOS fed during decoding, in row 0 only; row 1 keeps its document going.
    prompt = torch.cat([a, a.flip(1)])
    fed = torch.cat([torch.cat([eos, b], 1), torch.cat([a[:, :1], b], 1)])
    steps = _teacher_forced(m, prompt, fed)
    assert (steps[0, 2:] - _teacher_forced(m, b[:, :1], b[:, 1:])[0]).abs().max() <= rel_tol(name) * steps.abs().max()
    whole = m(torch.cat([prompt, fed], 1))[:, prompt.shape[1] - 1 :]  # the training forward, isolated too
    assert (steps - whole).abs().max() <= rel_tol(name) * whole.abs().max()


def test_isolation_needs_the_eos_id():
    m = HippoLM(ModelConfig(**{**BASE, **MIXERS["attention"], "eos_id": None}))
    with pytest.raises(ConfigError, match="model.eos_id"):
        m(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="model.eos_id=40"):
        ModelConfig(**{**BASE, "eos_id": V})


def test_isolation_off_calls_the_mixers_as_before():
    """Off (the default), the blocks pass no `doc_start` at all: the paper's configs run unchanged."""
    assert ModelConfig().document_isolation is False
    seen = []
    m = model("attention", isolation=False)
    for block in m.layers.values():
        block.mixer.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    m(window(1, length=16, eos_at=(5,)))
    assert seen == [{}, {}]


@pytest.mark.compile
def test_flex_attention_block_mask_equals_the_boolean_mask():
    """The CUDA path for long sequences (flex attention with a block mask), run on the CPU:
    the same output as SDPA with the materialized mask, also offset like a context-parallel chunk."""
    torch.manual_seed(0)
    B, H, S, hd = 2, 2, 256, 16
    q, k, v = (torch.randn(B, H, S, hd) for _ in range(3))
    ids = torch.cat([window(1, length=S, eos_at=(0, 63, 64, 200)), window(2, length=S, eos_at=(127,))])
    k_doc = document_ids(document_starts(ids, EOS))
    for Lq in (S, S // 2):  # the last Lq queries: a chunk that sees the chunks before it
        q_doc = k_doc[:, -Lq:]
        got = flex_same_document(q[:, :, -Lq:], k, v, q_doc, k_doc)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, -Lq:], k, v, attn_mask=same_document_mask(q_doc, k_doc))
        assert (got - expected).abs().max() <= 1e-5
