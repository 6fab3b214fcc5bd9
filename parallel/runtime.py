"""Where Hippo runs: the one place that picks the device and the communication backend.

CUDA + NCCL where a GPU is visible, CPU + gloo otherwise. DeepSpeed picks its accelerator when it
is first imported, so it is imported only through `import_deepspeed`, which tells it about a
CPU-only machine first.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch


def has_gpu() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    return "nccl" if has_gpu() else "gloo"


def device(local_rank: int = 0) -> torch.device:
    return torch.device("cuda", local_rank) if has_gpu() else torch.device("cpu")


def configure_cpu_threads() -> None:
    """Without a GPU, ranks of one node share its cores: unless OMP_NUM_THREADS says otherwise,
    each takes its share (decided here, on the worker, not by the launching host)."""
    if has_gpu() or "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def import_deepspeed() -> ModuleType:
    if not has_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed
