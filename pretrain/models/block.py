"""Pre-norm residual block: x + mixer(LN(x)), then x + MLP(LN(x)).

The mixer of layer i is `model.layer_mixers[i]`: H3, the S4D baseline, or causal attention.
Under `model.document_isolation` each mixer gets the boundary map `doc_start` (B, L) bool; in the
layer list (`parallel.pipeline`: one activation passes from layer to layer) a block takes and
returns `(hidden, doc_start)`, except the last, which returns the hidden states alone for the
final norm.
"""

from __future__ import annotations

import contextlib

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
        self.last = layer_idx == cfg.n_layer - 1

    def forward(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        inference_params: InferenceParams | None = None,
        *,
        doc_start: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, D), or the layer list's `(x, doc_start)` (returned the same way but by the
        last block)."""
        if isinstance(x, tuple):
            h, doc_start = x
            h = self._forward(h, inference_params, doc_start)
            return h if self.last else (h, doc_start)
        return self._forward(x, inference_params, doc_start)

    def _dropout_rng(self):
        """The sequence-parallel dropout stream's context, only where dropout draws from it
        (entering it reads and sets RNG states: a graph break in a compiled block)."""
        return self.dropout_rng() if self.training and self.dropout.p > 0 else contextlib.nullcontext()

    def _forward(self, x: torch.Tensor, inference_params: InferenceParams | None,
                 doc_start: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(x)
        # Without a map the mixers are called as before isolation existed (no keyword at all).
        mixed = self.mixer(h, inference_params) if doc_start is None else self.mixer(h, inference_params,
                                                                                     doc_start=doc_start)
        with self._dropout_rng():
            x = x + self.sequence.dropout(mixed, self.dropout.p, self.training)
        mlp = self.mlp(self.norm2(x))
        with self._dropout_rng():
            return x + self.sequence.dropout(mlp, self.dropout.p, self.training)
