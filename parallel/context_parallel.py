"""Context parallelism: the collective behind `SequenceSplit`, and each rank's chunk of a batch.

One differentiable all-gather over the context-parallel group is all the layers need
(`pretrain.models.sequence_split`): its backward reduce-scatters the gradients, so each slot's
gradient, summed over the ranks that used it, lands on the rank the slot came from. The group's
ranks are consecutive within Megatron's data-parallel axis (order tp-cp-dp-pp), so DeepSpeed's
data axis is DP x CP: gradients are averaged, and ZeRO partitions, over both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hippo.pretrain.models.sequence_split import SINGLE_SEQUENCE, SequenceSplit


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty(size * x.numel())  # flat: the collectives concatenate along dim 0
        dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mine = grad.new_empty(grad[0].numel())
        dist.reduce_scatter_tensor(mine, grad.contiguous().view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return mine.view(grad.shape[1:]), None


def sequence_split(group, rank: int, size: int) -> SequenceSplit:
    """This rank's `SequenceSplit` over a context-parallel `group` of `size` ranks."""
    if size == 1:
        return SINGLE_SEQUENCE
    return SequenceSplit(rank=rank, size=size, all_gather=lambda x: _AllGather.apply(x, group))


def chunk_of(tokens: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Positions [rank L/size, (rank+1) L/size) of (B, L) inputs, labels or document starts
    (`doc_start`: the mixers gather what they need of the other ranks' starts themselves)."""
    L = tokens.shape[-1]
    if L % size:
        raise ValueError(f"sequence of {L} tokens does not split into {size} equal chunks")
    T = L // size
    return tokens[..., rank * T : (rank + 1) * T]
