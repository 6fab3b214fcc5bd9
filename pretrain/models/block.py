"""Pre-norm residual block: x + mixer(LN(x)), then x + MLP(LN(x))."""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.models.inference import InferenceParams


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp: nn.Module, *, eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), inference_params))
        return x + self.dropout(self.mlp(self.norm2(x)))
