"""Full tensors from shards and back: the single-process view of a model split over TP and PP ranks."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from hippo.parallel.groups import ParallelState
from hippo.parallel.pipeline import canonical_named_parameters
from hippo.pretrain.models.linear import partition_dim


@torch.no_grad()
def stage_full_parameters(module: nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """This pipeline stage's parameters, TP shards concatenated, under `HippoLM` names (CPU)."""
    out: dict[str, torch.Tensor] = {}
    tp = state.layout.tensor
    for name, p in canonical_named_parameters(module):
        dim = partition_dim(p)
        if dim is None or tp == 1:
            out[name] = p.detach().float().cpu().clone()
            continue
        parts = [torch.empty_like(p) for _ in range(tp)]
        dist.all_gather(parts, p.detach().contiguous(), group=state.tp_group)
        out[name] = torch.cat(parts, dim=dim).float().cpu()
    return out


def gather_to_rank0(module: nn.Module, state: ParallelState) -> dict[str, torch.Tensor] | None:
    """Every parameter as full tensors on global rank 0 (None elsewhere), for work only one
    process does on the whole model (benchmark evaluation). Rank 0 then holds the model on CPU:
    exports do not use this (they write stage by stage)."""
    mine = stage_full_parameters(module, state)
    keep = state.tp_rank == 0 and state.dp_rank == 0 and state.cp_rank == 0  # one copy per stage
    gathered = [None] * dist.get_world_size() if state.rank == 0 else None
    dist.gather_object(mine if keep else None, gathered, dst=0)
    if state.rank != 0:
        return None
    return {name: t for part in gathered if part for name, t in part.items()}


@torch.no_grad()
def load_full_parameters(module: nn.Module, state: ParallelState, full_tensor: Callable[[str], torch.Tensor]) -> None:
    """The inverse of `stage_full_parameters`: fill this rank's parameters (its TP shard of each)
    from single-process tensors under `HippoLM` names; `full_tensor(name)` reads one on demand,
    so a rank never holds more of the model than one tensor at a time."""
    tp = state.layout.tensor
    for name, p in canonical_named_parameters(module):
        full = full_tensor(name)
        dim = partition_dim(p)
        part = full if dim is None or tp == 1 else full.chunk(tp, dim=dim)[state.tp_rank]
        if part.shape != p.shape:
            raise ValueError(f"{name}: {tuple(full.shape)} does not split into this rank's {tuple(p.shape)}")
        p.copy_(part.to(device=p.device, dtype=p.dtype))
