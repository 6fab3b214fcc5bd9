"""Counting the bytes context parallelism's collectives send: a measuring tool for the context-
parallel test worker and `benchmarks/bench_context_parallel.py`, not part of the package."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def counted_collective_bytes() -> Iterator[dict[str, int]]:
    """Inside: every byte this rank hands to the all-gathers and reduce-scatters (the collectives
    context parallelism uses) is added to the yielded dict's "bytes". Wraps torch.distributed's
    functions for the duration and restores them on exit."""
    sent = {"bytes": 0}
    gather, scatter = dist.all_gather_into_tensor, dist.reduce_scatter_tensor

    def counted_gather(out, x, *args, **kwargs):
        sent["bytes"] += x.numel() * x.element_size()
        return gather(out, x, *args, **kwargs)

    def counted_scatter(out, x, *args, **kwargs):
        sent["bytes"] += out.numel() * out.element_size()
        return scatter(out, x, *args, **kwargs)

    dist.all_gather_into_tensor, dist.reduce_scatter_tensor = counted_gather, counted_scatter
    try:
        yield sent
    finally:
        dist.all_gather_into_tensor, dist.reduce_scatter_tensor = gather, scatter
