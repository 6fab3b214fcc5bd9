"""Where Hippo runs: the one place that picks the device and the communication backend.

CUDA + NCCL where a GPU is visible, CPU + gloo otherwise. DeepSpeed picks its accelerator when it
is first imported, so it is imported only through `import_deepspeed`, which tells it about a
CPU-only machine first.
"""

from __future__ import annotations

import os
import re
from types import ModuleType

import torch


def has_gpu() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    return "nccl" if has_gpu() else "gloo"


def local_device_index(local_rank: int) -> int:
    """The GPU a local rank uses among those it sees. A scheduler that gives each task its own
    GPU (SLURM `--gpus-per-task`, CUDA_VISIBLE_DEVICES per rank) leaves one visible device to a
    rank whose LOCAL_RANK is 5: index 0, not 5."""
    return local_rank % torch.cuda.device_count()


def device(local_rank: int = 0) -> torch.device:
    return torch.device("cuda", local_device_index(local_rank)) if has_gpu() else torch.device("cpu")


def bind_device(local_rank: int) -> torch.device:
    """This rank's device, made CUDA's current one (NCCL and `torch.cuda.current_device()` callers
    such as Megatron's buffers use it)."""
    dev = device(local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


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


PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    # (pattern searched in torch.cuda.get_device_name(), dense bf16 tensor FLOP/s of one device).
    # Vendor datasheets, without structured sparsity; the first matching pattern wins, so a
    # variant (PCIe, NVL) precedes its family.
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100 NVL\b", 835e12),
    (r"\bH200 NVL\b", 835e12),
    (r"\bGH200\b", 989e12),
    (r"\bH100\b", 989e12),       # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989e12),
    (r"\bH200\b", 989e12),       # SXM
    (r"\bGB200\b", 2.5e15),
    (r"\bB200\b", 2.25e15),
    (r"\bA100\b", 312e12),       # SXM and PCIe, 40 and 80 GB
    (r"\bA800\b", 312e12),
    (r"\bA30\b", 165e12),
    (r"\bA40\b", 149.7e12),
    (r"\bA10\b", 125e12),        # not A10G (AWS), whose clocks differ
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bRTX A6000\b", 154.8e12),
    (r"\bMI300X\b", 1307.4e12),
    (r"\bMI250X\b", 383e12),
]
"""Peak dense bf16 FLOP/s per device, for `train.peak_flops: 0` (MFU without a number to look up)."""


def peak_flops_of(device_name: str) -> float:
    """Dense bf16 peak FLOP/s of the device named `device_name` (as CUDA reports it); 0.0 for a
    device not in `PEAK_BF16_FLOPS` (MFU is then not reported rather than made up)."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return flops
    return 0.0


def detected_peak_flops() -> float:
    """Peak FLOP/s of this rank's GPU from its name; 0.0 on CPU or an unknown GPU."""
    return peak_flops_of(torch.cuda.get_device_name()) if has_gpu() else 0.0
