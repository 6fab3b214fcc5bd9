"""Parameter-holding modules for the shift and diagonal SSMs (one filter per channel).

A module holds the channels of its tensor-parallel rank. Its `initial_value` draws a parameter at
the full layer's size, so `pretrain.models.init` can give every layout its share of the same
initialization.
Parameters that set the SSM dynamics are tagged with `mark_ssm_dynamics` so the optimizer can
give them no weight decay and a capped learning rate (the paper's rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hippo.kernels import (
    DiscreteDiagonalSSM,
    diagonal_kernel,
    diagonal_state_from_prefix,
    discretize_diagonal,
    fftconv,
)
from hippo.kernels.ssm import (
    DiagonalDecoder,
    diagonal_decode_state,
    diagonal_decode_step,
    diagonal_decoder,
    shift_ring_from_prefix,
    shift_ring_step,
    shift_ring_taps,
)
from hippo.pretrain.models.linear import mark_tensor_parallel

SSM_DYNAMICS_ATTR = "_ssm_dynamics"


def mark_ssm_dynamics(param: nn.Parameter) -> nn.Parameter:
    setattr(param, SSM_DYNAMICS_ATTR, True)
    return param


def is_ssm_dynamics(param: torch.Tensor) -> bool:
    return getattr(param, SSM_DYNAMICS_ATTR, False)


class _PerChannelParams(nn.Module):
    """Parameters whose first dim is the channel: split over TP ranks like a column-parallel
    output, each drawn by `initial_value` at the full layer's size (see `pretrain.models.init`)."""

    def _add(self, name: str, *shape: int, dynamics: bool = False) -> None:
        param = mark_tensor_parallel(nn.Parameter(torch.empty(*shape)), dim=0)
        self.register_parameter(name, mark_ssm_dynamics(param) if dynamics else param)

    def initial_value(self, name: str, shape: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Standalone init from the global RNG (a model re-initializes per parameter name)."""
        for name, p in self.named_parameters(recurse=False):
            p.copy_(self.initial_value(name, tuple(p.shape), None))


class ShiftSSM(_PerChannelParams):
    """Learned causal FIR filter of d_state taps per channel, plus a skip term.

    B starts as e1 so the filter equals C at init. Holds the parameters only: the convolution
    runs in `kernels.h3_core` (with the diagonal SSM), the recurrent mode in `ring_step`.
    """

    def __init__(self, channels: int, d_state: int = 64):
        super().__init__()
        self._add("B", channels, d_state, dynamics=True)
        self._add("C", channels, d_state)
        self._add("D", channels)
        self.reset_parameters()

    def initial_value(self, name: str, shape: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
        if name == "B":
            B = torch.zeros(shape)
            B[:, 0] = 1.0
            return B
        if name == "C":
            bound = 1.0 / math.sqrt(shape[-1])
            return torch.empty(shape).uniform_(-bound, bound, generator=gen)
        return torch.randn(shape, generator=gen)  # D

    # Generation keeps the last N inputs in a ring (`kernels.ssm.shift_ring_step`): the outputs of
    # the shifted-state recurrence, without shifting a (batch, channels, N) state every token.
    def ring_taps(self) -> torch.Tensor:
        """(channels, 2N) ring-ordered taps with D folded in; fixed while generating."""
        return shift_ring_taps(self.B.float(), self.C.float(), self.D.float())

    def ring_from_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, channels, L) -> the (channels, N, batch) ring window after it."""
        return shift_ring_from_prefix(x.float(), self.B.shape[-1])

    def ring_step(self, window: torch.Tensor, taps: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        """Token x_t (batch, channels) at position t; updates `window` in place."""
        return shift_ring_step(window, taps, x.float(), t).to(x.dtype)


class DiagonalSSM(_PerChannelParams):
    """S4D-Lin diagonal SSM with d_state/2 complex modes per channel, bilinear discretization."""

    def __init__(self, channels: int, d_state: int = 64, *, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        self.dt_min, self.dt_max = dt_min, dt_max
        modes = d_state // 2
        self._add("log_dt", channels, dynamics=True)
        self._add("log_A_real", channels, modes, dynamics=True)
        self._add("A_imag", channels, modes, dynamics=True)
        self._add("B", channels, modes, 2, dynamics=True)
        self._add("C", channels, modes, 2)
        self._add("D", channels)
        self.reset_parameters()

    def initial_value(self, name: str, shape: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
        if name == "log_dt":  # dt log-uniform in [dt_min, dt_max]
            lo, hi = math.log(self.dt_min), math.log(self.dt_max)
            return torch.rand(shape, generator=gen) * (hi - lo) + lo
        if name == "log_A_real":  # Re(A) = -0.5
            return torch.full(shape, math.log(0.5))
        if name == "A_imag":  # Im(A_n) = pi n
            return math.pi * torch.arange(shape[-1], dtype=torch.float32).expand(shape).clone()
        if name == "B":  # B = 1 (real part 1, imaginary 0)
            B = torch.zeros(shape)
            B[..., 0] = 1.0
            return B
        if name == "C":
            return torch.randn(shape, generator=gen) / math.sqrt(2.0)
        return torch.randn(shape, generator=gen)  # D

    def discrete(self) -> DiscreteDiagonalSSM:
        return discretize_diagonal(
            self.log_dt.float(), self.log_A_real.float(), self.A_imag.float(), self.B.float(), self.C.float()
        )

    def forward(self, x: torch.Tensor, discrete: DiscreteDiagonalSSM | None = None) -> torch.Tensor:
        """x: (batch, channels, L) -> (batch, channels, L)."""
        discrete = self.discrete() if discrete is None else discrete
        return fftconv(x, diagonal_kernel(discrete, x.shape[-1]), self.D)

    def state_from_prefix(self, x: torch.Tensor, discrete: DiscreteDiagonalSSM | None = None) -> torch.Tensor:
        return diagonal_state_from_prefix(x.float(), self.discrete() if discrete is None else discrete)

    # Generation (`kernels.ssm.diagonal_decode_step`): the discretized SSM laid out once after
    # the prefill and kept with the state, which is updated in place.
    def decoder(self, discrete: DiscreteDiagonalSSM | None = None) -> DiagonalDecoder:
        return diagonal_decoder(self.discrete() if discrete is None else discrete, self.D.float())

    def decode_state(self, state: torch.Tensor, discrete: DiscreteDiagonalSSM | None = None) -> torch.Tensor:
        """A (batch, channels, N/2) state (`state_from_prefix`) -> the (channels, batch, N/2) decode state."""
        return diagonal_decode_state(state, self.discrete() if discrete is None else discrete)

    def decode_step(self, s: torch.Tensor, decoder: DiagonalDecoder, x: torch.Tensor) -> torch.Tensor:
        """Token x (batch, channels); updates the decode state `s` in place."""
        return diagonal_decode_step(s, decoder, x.float()).to(x.dtype)
