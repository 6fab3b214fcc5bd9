"""Per-rank memory of parameters, gradients and optimizer state for a layout, from the sharding
alone: each stage's layers are built on the meta device with linears of the shard's shape, so
the counts come from the same model code that trains, and nothing is allocated.

Bytes per parameter follow DeepSpeed's mixed-precision accounting: bf16 keeps bf16 weights and
gradients and an fp32 master copy plus Adam's two moments (12 bytes); fp32 keeps weights and
gradients in fp32 and the two moments (8 bytes). ZeRO-1 splits the optimizer bytes over the
data-parallel group, ZeRO-2 the gradient bytes too. Activations are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from hippo.parallel.layout import ParallelLayout
from hippo.parallel.pipeline import layer_parameter_counts, shard_shaped_linears, stage_bounds
from hippo.pretrain.models.config import ModelConfig

GIB = 2**30


def stage_parameter_counts(cfg: ModelConfig, layout: ParallelLayout) -> list[int]:
    """Parameters one tensor-parallel rank of each pipeline stage holds (tied embedding counted
    on both end stages when they differ, as DeepSpeed keeps a copy on each)."""
    sizes = layer_parameter_counts(cfg, shard_shaped_linears(layout.tensor))
    bounds = stage_bounds(cfg, layout)
    counts = [sum(sizes[bounds[s] : bounds[s + 1]]) for s in range(layout.pipeline)]
    if layout.pipeline == 1:
        counts[0] -= sizes[-1]  # one stage: the head reuses the embedding's weight
    return counts


@dataclass(frozen=True)
class RankMemory:
    parameters: int
    """Parameters held by the busiest rank."""
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes


def rank_memory(cfg: ModelConfig, layout: ParallelLayout, *, precision: str = "fp32") -> RankMemory:
    n = max(stage_parameter_counts(cfg, layout))
    weight, grad, optim = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    zero = layout.zero_stage
    optim_bytes = n * optim // (layout.replicas if zero >= 1 else 1)
    grad_bytes = n * grad // (layout.replicas if zero >= 2 else 1)
    return RankMemory(n, n * weight, grad_bytes, optim_bytes)
