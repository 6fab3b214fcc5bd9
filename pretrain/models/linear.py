"""How layers get their linear maps: the seam between the models and model parallelism.

Models never import Megatron. They ask a `Linears` object for column-parallel maps (output
features split over tensor-parallel ranks), row-parallel maps (input features split), the token
embedding (vocabulary split), the tied LM head and its cross entropy, the share of per-channel
state (SSM parameters, attention heads) their rank owns, the RNG context for dropout inside a
tensor-parallel region, and which chunk of each sequence the rank holds (context parallelism).
`parallel/` builds a `Linears` from Megatron layers; the default is plain PyTorch on one rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from hippo.pretrain.models.sequence_split import SINGLE_SEQUENCE, SequenceSplit

class LinearFactory(Protocol):
    def __call__(self, in_features: int, out_features: int, *, bias: bool = True) -> nn.Module: ...


def _dense(in_features: int, out_features: int, *, bias: bool = True) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (shape of labels), computed in float32."""
    flat = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none")
    return flat.view_as(labels)


def mark_tensor_parallel(param: torch.Tensor, dim: int) -> torch.Tensor:
    """Tag a parameter as this rank's shard of a tensor split along `dim` (Megatron's tags)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def partition_dim(param: torch.Tensor) -> int | None:
    """The dim a parameter is split along over TP ranks, or None for a replicated one."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


@dataclass(frozen=True)
class Linears:
    """Factories for the layers tensor parallelism splits, and this rank's place in the TP group.

    A column factory called with (in, out) returns a module mapping in -> out / tp_size; a row
    factory maps in / tp_size -> out (its output already reduced over the group). `embedding`
    holds vocab / tp_size rows; `lm_logits(h, weight)` gives this rank's vocabulary slice of the
    logits and `cross_entropy(logits, labels)` the per-token loss over the whole vocabulary.
    """

    column: LinearFactory | Callable[..., nn.Module] = _dense
    row: LinearFactory | Callable[..., nn.Module] = _dense
    embedding: Callable[[int, int], nn.Module] = nn.Embedding
    lm_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _token_cross_entropy
    tp_rng: Callable[[], ContextManager] = contextlib.nullcontext
    """Context for dropout on tensor-parallel activations (each TP rank draws its own mask)."""
    sequence_rng: Callable[[], ContextManager] = contextlib.nullcontext
    """Context for dropout on hidden states between blocks: `tp_rng` under sequence parallelism
    (each rank holds other positions), else the default generator (replicated activations)."""
    tp_rank: int = 0
    tp_size: int = 1
    sequence: SequenceSplit = SINGLE_SEQUENCE
    """This rank's chunk of every sequence under context parallelism (whole sequences by default)."""

    def local(self, n: int, what: str = "features") -> int:
        """This rank's share of n items split evenly over the TP group."""
        if n % self.tp_size:
            raise ValueError(f"{what}={n} is not divisible by tensor_parallel={self.tp_size}")
        return n // self.tp_size


SINGLE_PROCESS = Linears()
