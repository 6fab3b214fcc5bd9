"""The environment contract between every launcher and `hippo train`.

Launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun and the
DeepSpeed launcher do it themselves); `worker_env` adds the communication settings, in this one
place: NCCL's error handling on GPUs, the CPU accelerator for DeepSpeed and one thread per rank
without them.
"""

from __future__ import annotations

import os

from parallel.runtime import has_gpu


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if has_gpu():
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer fails the step, not a hang
    else:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")  # several ranks share the cores
    return env


def train_argv(config: str, run_dir: str | None, sets: list[str]) -> list[str]:
    """`hippo train` as each worker runs it (a module, so any Python on the node works)."""
    argv = ["-m", "pretrain.cli", "train", config]
    if run_dir:
        argv += ["--run-dir", run_dir]
    for s in sets:
        argv += ["--set", s]
    return argv
