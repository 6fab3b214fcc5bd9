"""HippoLM: token embedding, a stack of pre-norm blocks (H3, S4D or attention mixers), final
LayerNorm, and an LM head tied to the embedding. No position embeddings unless configured
(H3 layers give attention layers their sense of order).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.attention import CausalSelfAttention
from pretrain.models.block import Block
from pretrain.models.h3 import H3
from pretrain.models.inference import InferenceParams
from pretrain.models.linear import SINGLE_PROCESS, Linears
from pretrain.models.mlp import MLP
from pretrain.models.s4d import S4D


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int, linears: Linears) -> nn.Module:
    if kind == "h3":
        return H3(cfg.d_model, cfg.d_state, layer_idx=layer_idx, linears=linears)
    if kind == "s4d":
        return S4D(cfg.d_model, cfg.d_state, layer_idx=layer_idx, linears=linears)
    if kind == "attention":
        return CausalSelfAttention(
            cfg.d_model,
            cfg.n_head,
            layer_idx=layer_idx,
            rotary=cfg.position_embedding == "rotary",
            dropout=cfg.dropout,
            linears=linears,
        )
    raise ValueError(f"unknown mixer {kind!r}")


def build_block(cfg: ModelConfig, layer_idx: int, linears: Linears = SINGLE_PROCESS) -> Block:
    mixer = build_mixer(cfg.layer_mixers[layer_idx], cfg, layer_idx, linears)
    mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, linears=linears)
    return Block(cfg.d_model, mixer, mlp, eps=cfg.layer_norm_eps, dropout=cfg.dropout)


class HippoLM(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: Linears = SINGLE_PROCESS, *, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.pos_embed = (
            nn.Embedding(cfg.max_position_embeddings, cfg.d_model) if cfg.position_embedding == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        # ModuleDict keyed by layer index: names survive pipeline splits and checkpoints.
        self.layers = nn.ModuleDict({str(i): build_block(cfg, i, linears) for i in range(cfg.n_layer)})
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if init:
            init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, padded_vocab)."""
        offset = inference_params.seqlen_offset if inference_params is not None else 0
        if offset > 0 and input_ids.shape[1] != 1:
            raise ValueError("after the prefill, recurrent mode takes one token per call")
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            L = input_ids.shape[1]
            if offset + L > self.cfg.max_position_embeddings:
                raise ValueError(f"sequence of {offset + L} exceeds max_position_embeddings")
            h = h + self.pos_embed(torch.arange(offset, offset + L, device=input_ids.device))
        h = self.trunk(self.drop(h), inference_params)
        return F.linear(h, self.embed.weight)

    def trunk(self, h: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """Blocks and final norm on hidden states (B, L, D)."""
        for block in self.layers.values():
            h = block(h, inference_params)
        return self.norm_f(h)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """The paper's init: Linear/Embedding N(0, std), zero biases; residual outputs (attention
    out-proj, MLP fc2) scaled by 1/sqrt(2 n_layer); SSM parameters keep their own init."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = cfg.init_std
            if getattr(module, "residual_out", False):
                std /= math.sqrt(2 * cfg.n_layer)
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the single-process model (tied head counted once), without allocating."""
    with torch.device("meta"):
        model = HippoLM(cfg, init=False)
    return sum(p.numel() for p in model.parameters())
