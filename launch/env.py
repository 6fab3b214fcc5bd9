"""The environment contract between every launcher and `hippo train`.

Launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun and the
DeepSpeed launcher do it themselves); `worker_env` adds the communication settings, in this one
place. What depends on the worker's hardware (DeepSpeed's accelerator, CPU threads per rank) is
decided on the worker (`hippo.parallel.runtime`), never here: a launching host (a login node)
has no GPU, and what it exports reaches every node. This package imports no torch.
"""

from __future__ import annotations

import os


HOST_DECIDED = ("DS_ACCELERATOR", "OMP_NUM_THREADS")
"""Settings each worker makes for its own hardware (`hippo.parallel.runtime`): a value in the
launching host's environment describes that host (a GPU-less login node), not the workers."""


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer fails the step, not a hang (NCCL only)
    return env


def job_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a batch job is submitted with. sbatch hands the submitting environment to
    every node of the job (`--export=ALL`, its default), so the host-decided settings stay behind."""
    return {k: v for k, v in worker_env(base).items() if k not in HOST_DECIDED}


def train_argv(config: str, run_dir: str | None, sets: list[str]) -> list[str]:
    """`hippo train` as each worker runs it (a module, so any Python on the node works)."""
    argv = ["-m", "hippo.pretrain.cli", "train", config]
    if run_dir:
        argv += ["--run-dir", run_dir]
    for s in sets:
        argv += ["--set", s]
    return argv


FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "HIPPO_", "GLOO_", "CUDA_LAUNCH_BLOCKING")
"""Settings a launcher that starts remote workers by ssh (DeepSpeed's pdsh runner) must carry to
them. DeepSpeed forwards NCCL_* only when the launching host itself has CUDA, so from a login node
it would drop the network settings a job depends on (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...)."""


def forwarded_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The communication settings of `worker_env` to carry to remote workers (never the host-decided ones)."""
    return {k: v for k, v in worker_env(base).items()
            if k.startswith(FORWARDED_PREFIXES) and k not in HOST_DECIDED and "\n" not in v}
