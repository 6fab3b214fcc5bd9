"""Parameter-holding modules for the shift and diagonal SSMs (one filter per channel).

Parameters are drawn for all `channels` of the full layer, then sliced to `channel_slice`, so a
tensor-parallel rank starts from exactly its share of the single-process initialization.
Parameters that set the SSM dynamics are tagged with `mark_ssm_dynamics` so the optimizer can
give them no weight decay and a capped learning rate (the paper's rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kernels import (
    DiscreteDiagonalSSM,
    diagonal_kernel,
    diagonal_state_from_prefix,
    diagonal_step,
    discretize_diagonal,
    fftconv,
    shift_kernel,
    shift_state_from_prefix,
    shift_step,
)

SSM_DYNAMICS_ATTR = "_ssm_dynamics"


def mark_ssm_dynamics(param: nn.Parameter) -> nn.Parameter:
    setattr(param, SSM_DYNAMICS_ATTR, True)
    return param


def is_ssm_dynamics(param: torch.Tensor) -> bool:
    return getattr(param, SSM_DYNAMICS_ATTR, False)


def _param(full: torch.Tensor, channel_slice: slice) -> nn.Parameter:
    return nn.Parameter(full[channel_slice].contiguous())


class ShiftSSM(nn.Module):
    """Learned causal FIR filter of d_state taps per channel, plus a skip term.

    B starts as e1 so the filter equals C at init.
    """

    def __init__(self, channels: int, d_state: int = 64, *, channel_slice: slice | None = None):
        super().__init__()
        sl = channel_slice or slice(0, channels)
        B = torch.zeros(channels, d_state)
        B[:, 0] = 1.0
        bound = 1.0 / math.sqrt(d_state)
        C = torch.empty(channels, d_state).uniform_(-bound, bound)
        D = torch.randn(channels)
        self.B = mark_ssm_dynamics(_param(B, sl))
        self.C = _param(C, sl)
        self.D = _param(D, sl)

    def kernel(self, length: int) -> torch.Tensor:
        return shift_kernel(self.B, self.C, min(length, self.B.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, L) -> (batch, channels, L)."""
        return fftconv(x, self.kernel(x.shape[-1]), self.D)

    def allocate_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, *self.B.shape, device=self.B.device, dtype=torch.float32)

    def state_from_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return shift_state_from_prefix(x.float(), self.B.float())

    def step(self, state: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, new_state = shift_step(state, x.float(), self.B.float(), self.C.float(), self.D.float())
        return y.to(x.dtype), new_state


class DiagonalSSM(nn.Module):
    """S4D-Lin diagonal SSM with d_state/2 complex modes per channel, bilinear discretization."""

    def __init__(
        self,
        channels: int,
        d_state: int = 64,
        *,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        channel_slice: slice | None = None,
    ):
        super().__init__()
        sl = channel_slice or slice(0, channels)
        modes = d_state // 2
        log_dt = torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        log_A_real = torch.full((channels, modes), math.log(0.5))
        A_imag = math.pi * torch.arange(modes, dtype=torch.float32).expand(channels, modes).clone()
        B = torch.zeros(channels, modes, 2)
        B[..., 0] = 1.0
        C = torch.randn(channels, modes, 2) / math.sqrt(2.0)
        D = torch.randn(channels)
        self.log_dt = mark_ssm_dynamics(_param(log_dt, sl))
        self.log_A_real = mark_ssm_dynamics(_param(log_A_real, sl))
        self.A_imag = mark_ssm_dynamics(_param(A_imag, sl))
        self.B = mark_ssm_dynamics(_param(B, sl))
        self.C = _param(C, sl)
        self.D = _param(D, sl)

    def discrete(self) -> DiscreteDiagonalSSM:
        return discretize_diagonal(
            self.log_dt.float(), self.log_A_real.float(), self.A_imag.float(), self.B.float(), self.C.float()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, L) -> (batch, channels, L)."""
        return fftconv(x, diagonal_kernel(self.discrete(), x.shape[-1]), self.D)

    def allocate_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, *self.A_imag.shape, device=self.D.device, dtype=torch.complex64)

    def state_from_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return diagonal_state_from_prefix(x.float(), self.discrete())

    def step(self, state: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, new_state = diagonal_step(state, x.float(), self.discrete(), self.D.float())
        return y.to(x.dtype), new_state
