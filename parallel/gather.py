"""Full tensors from shards: the single-process view of a model split over TP and PP ranks."""

from __future__ import annotations

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


def full_parameters(module: nn.Module, state: ParallelState) -> dict[str, torch.Tensor] | None:
    """Every parameter of the model as full tensors on global rank 0 (None elsewhere)."""
    mine = stage_full_parameters(module, state)
    keep = state.tp_rank == 0 and state.dp_rank == 0  # one copy per stage
    gathered = [None] * dist.get_world_size() if state.rank == 0 else None
    dist.gather_object(mine if keep else None, gathered, dst=0)
    if state.rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        if part:
            merged.update(part)
    return merged
