"""How layers get their linear maps: the seam between the models and tensor parallelism.

Models never import Megatron. They ask a `Linears` object for column-parallel maps (output
features split over tensor-parallel ranks) and row-parallel maps (input features split),
and for the share of per-channel state (SSM parameters, attention heads) their rank owns.
`parallel/` builds a `Linears` whose factories return Megatron layers; the default is plain
`nn.Linear` on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch.nn as nn


class LinearFactory(Protocol):
    def __call__(self, in_features: int, out_features: int, *, bias: bool = True) -> nn.Module: ...


def _dense(in_features: int, out_features: int, *, bias: bool = True) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


@dataclass(frozen=True)
class Linears:
    """Factories for the two kinds of linear map, and this rank's place in the TP group.

    A column factory called with (in, out) returns a module mapping in -> out / tp_size; a row
    factory maps in / tp_size -> out (its output already reduced over the group).
    """

    column: LinearFactory | Callable[..., nn.Module] = _dense
    row: LinearFactory | Callable[..., nn.Module] = _dense
    tp_rank: int = 0
    tp_size: int = 1

    def local(self, n: int, what: str = "features") -> int:
        """This rank's share of n items split evenly over the TP group."""
        if n % self.tp_size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel={self.tp_size}")
        return n // self.tp_size

    def shard(self, n: int, what: str = "features") -> slice:
        """This rank's contiguous slice of n items (same order as a column-parallel output)."""
        size = self.local(n, what)
        return slice(self.tp_rank * size, (self.tp_rank + 1) * size)


SINGLE_PROCESS = Linears()
