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


def import_deepspeed() -> ModuleType:
    if not has_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed
