"""Partial rotary (the released H3-2.7B: 64 of 128 head dims, halves paired, base 10000) against a
direct float64 computation, in the training forward and the KV-cache decode step."""

from __future__ import annotations

import math

import pytest
import torch

from hippo.pretrain.models import CausalSelfAttention, HippoLM, InferenceParams, ModelConfig
from hippo.pretrain.models.config import ConfigError

D, HEADS, ROTARY = 32, 2, 8  # head_dim 16, the first 8 dims rotate


def direct_attention(layer: CausalSelfAttention, x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """float64: each pair (j, j + r/2), j < r/2, of a head's first r dims turned by the angle
    position * 10000^(-2j/r); the other dims unchanged; causal softmax attention."""
    x = x.double()
    B, L, _ = x.shape
    hd = D // HEADS

    def heads(proj: torch.nn.Linear) -> torch.Tensor:
        return (x @ proj.weight.double().T + proj.bias.double()).view(B, L, HEADS, hd)

    q, k, v = heads(layer.q_proj), heads(layer.k_proj), heads(layer.v_proj)
    half = rotary_dim // 2
    for t in (q, k):
        for pos in range(L):
            for j in range(half):
                angle = pos * 10000.0 ** (-2 * j / rotary_dim)
                a, b = t[:, pos, :, j].clone(), t[:, pos, :, j + half].clone()
                t[:, pos, :, j] = a * math.cos(angle) - b * math.sin(angle)
                t[:, pos, :, j + half] = a * math.sin(angle) + b * math.cos(angle)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, D)
    return y @ layer.out_proj.weight.double().T + layer.out_proj.bias.double()


def _layer(rotary_dim: int | None) -> CausalSelfAttention:
    torch.manual_seed(0)
    layer = CausalSelfAttention(D, HEADS, layer_idx=0, rotary=True, rotary_dim=rotary_dim).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return layer


@pytest.mark.parametrize("rotary_dim", [ROTARY, None])
def test_rotary_on_leading_head_dims_matches_a_direct_computation(rotary_dim):
    """rotary_dim=8 turns only the first 8 of 16 dims (a whole-head rotary, None, is the other case)."""
    layer = _layer(rotary_dim)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x).double()
    expected = direct_attention(layer, x, rotary_dim or D // HEADS)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    other = direct_attention(layer, x, D // HEADS if rotary_dim else ROTARY)
    assert (got - other).abs().max() > 1e-2 * expected.abs().max()  # the width matters


def test_partial_rotary_decode_step_matches_the_full_pass():
    """Prefill, then one token at a time through the KV cache: positions continue at the offset."""
    layer = _layer(ROTARY)
    x = torch.randn(1, 30, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = layer(x)
        params = InferenceParams(max_seqlen=30, max_batch_size=1)
        steps = [layer(x[:, :11], params)]
        for t in range(11, 30):
            params.seqlen_offset = t
            steps.append(layer(x[:, t : t + 1], params))
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5 * full.abs().max()
    assert (full.double() - direct_attention(layer, x, ROTARY)).abs().max() <= 1e-5 * full.abs().max()


def test_the_model_builds_partial_rotary_from_its_config():
    cfg = ModelConfig(vocab_size=61, d_model=D, n_layer=2, n_head=HEADS, attn_layer_idx=[1],
                      position_embedding="rotary", rotary_dim=ROTARY)
    assert HippoLM(cfg, init=False).layers["1"].mixer.rotary_dim == ROTARY


@pytest.mark.parametrize("fields,message", [
    (dict(rotary_dim=8), "needs model.position_embedding=rotary"),
    (dict(position_embedding="rotary", rotary_dim=7), "must be even"),
    (dict(position_embedding="rotary", rotary_dim=32), "exceeds the head dimension"),
])
def test_rotary_dim_is_validated(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(vocab_size=61, d_model=D, n_layer=2, n_head=HEADS, attn_layer_idx=[1], **fields)
