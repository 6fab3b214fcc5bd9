"""Position-wise MLP: fc1 (column-parallel), tanh-GELU, fc2 (row-parallel)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears


class MLP(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, *, linears: Linears = SINGLE_PROCESS):
        super().__init__()
        self.fc1 = linears.column(d_model, d_hidden, bias=True)
        self.fc2 = linears.row(d_hidden, d_model, bias=True)
        self.fc2.residual_out = True  # rescaled at init by 1/sqrt(2 n_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
