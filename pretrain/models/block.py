"""Pre-norm residual block: x + mixer(LN(x)), then x + MLP(LN(x)).

The mixer of layer i is `model.layer_mixers[i]`: H3, the S4D baseline, or causal attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.attention import CausalSelfAttention
from hippo.pretrain.models.h3 import H3
from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears
from hippo.pretrain.models.mlp import MLP
from hippo.pretrain.models.s4d import S4D


def build_mixer(kind: str, cfg: ModelConfig, layer_idx: int, linears: Linears) -> nn.Module:
    if kind == "h3":
        return H3(cfg.d_model, cfg.d_state, layer_idx=layer_idx, linears=linears, conv_impl=cfg.conv_impl)
    if kind == "s4d":
        return S4D(cfg.d_model, cfg.d_state, layer_idx=layer_idx, linears=linears)
    if kind == "attention":
        return CausalSelfAttention(
            cfg.d_model,
            cfg.n_head,
            layer_idx=layer_idx,
            rotary=cfg.position_embedding == "rotary",
            rotary_dim=cfg.rotary_dim,
            dropout=cfg.dropout,
            linears=linears,
        )
    raise ValueError(f"unknown mixer {kind!r}")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, linears: Linears = SINGLE_PROCESS):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mixer = build_mixer(cfg.layer_mixers[layer_idx], cfg, layer_idx, linears)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, linears=linears)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dropout_rng = linears.sequence_rng
        self.sequence = linears.sequence  # dropout masks of the whole sequence, this rank's chunk

    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        mixed = self.mixer(self.norm1(x), inference_params)
        with self.dropout_rng():
            x = x + self.sequence.dropout(mixed, self.dropout.p, self.training)
        mlp = self.mlp(self.norm2(x))
        with self.dropout_rng():
            return x + self.sequence.dropout(mlp, self.dropout.p, self.training)
