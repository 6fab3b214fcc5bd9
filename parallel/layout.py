"""How one run is split over its ranks: the sizes and options every parallel component reads.

Plain Python (no torch), so the run config can build and check it on a launching host. The run
config validates the sections against each other (`HippoConfig.layout`); the components here
take the result as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ParallelLayout", "PipelinePartition"]

PipelinePartition = Literal["parameters", "uniform"]


@dataclass(frozen=True)
class ParallelLayout:
    """The validated parallel layout of a run on `world_size` ranks."""

    world_size: int
    tensor: int
    pipeline: int
    data: int
    micro_batch_size: int
    grad_accum_steps: int
    context: int = 1
    """Ranks each sequence is split over (contiguous chunks of seq_len / context)."""
    zero_stage: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    pipeline_partition: PipelinePartition = "parameters"
    stage_layers: tuple[int, ...] = ()
    """Explicit blocks per pipeline stage; empty: `pipeline_partition` decides."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.data

    @property
    def replicas(self) -> int:
        """Ranks that hold the same parameters (DeepSpeed's data axis): gradients are averaged,
        and ZeRO partitions, over data x context."""
        return self.data * self.context

    @property
    def pipelined(self) -> bool:
        """DeepSpeed's pipeline engine runs the model, except for ZeRO-2 on one stage (which
        DeepSpeed refuses under a `PipelineModule`): that runs the plain engine. On one stage the
        pipeline engine is as fast at ZeRO-1, 8% faster at ZeRO-0 with one replica (its all-reduce
        skipped), and keeps the per-layer weight files of every ZeRO <= 1 run (BENCHMARKS.md, "One
        pipeline stage"; an fp32 ZeRO-0 run's optimizer state still cannot change layout:
        `Checkpoint.move_problem`)."""
        return self.pipeline > 1 or self.zero_stage <= 1
