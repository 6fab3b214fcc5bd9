"""An sbatch script: one torchrun agent per node (srun), rendezvous on the first node, requeue.

`--signal=TERM@N` (no `B:`) has SLURM send SIGTERM to the job step's tasks, the torchrun agents,
N seconds before the time limit; each agent passes it to its workers and `hippo train` finishes
its step, writes a checkpoint and exits. torchrun SIGKILLs workers that have not exited 30 s
after the signal unless told otherwise, too short for a large model's checkpoint: the script
gives them `--shutdown-timeout`, most of the N seconds. On preemption SLURM sends the same
SIGTERM; `--requeue` puts the job back in the queue and the same command resumes from the latest
checkpoint. Without `srun` on the PATH (a local test) the script runs the one node's torchrun
directly, reading the same SLURM_* variables.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

from hippo.pretrain.config import ConfigError


SHUTDOWN_MARGIN_S = 15
"""Seconds of the signal lead kept for torchrun's own exit after its workers'."""


@dataclass(frozen=True)
class SlurmSpec:
    nodes: int
    gpus_per_node: int
    job_name: str = "hippo"
    time: str = "24:00:00"
    partition: str | None = None
    rdzv_port: int = 29500
    max_restarts: int = 3
    output: str = "slurm-%j.out"
    signal_lead_s: int = 120
    """SIGTERM this long before the time limit, so the run checkpoints before it is killed."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {self.nodes}, {self.gpus_per_node}")
        if self.signal_lead_s <= SHUTDOWN_MARGIN_S:
            raise ConfigError(f"the signal lead must exceed {SHUTDOWN_MARGIN_S} s, got {self.signal_lead_s}")

    @property
    def shutdown_timeout_s(self) -> int:
        """How long torchrun lets its workers finish after the SIGTERM: the lead, less a margin for
        the agents to exit before the time limit."""
        return self.signal_lead_s - SHUTDOWN_MARGIN_S


def sbatch_script(spec: SlurmSpec, worker_argv: list[str], python: str = sys.executable) -> str:
    partition = f"#SBATCH --partition={spec.partition}\n" if spec.partition else ""
    worker = shlex.join(worker_argv)
    return f"""#!/bin/bash
#SBATCH --job-name={spec.job_name}
#SBATCH --nodes={spec.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={spec.gpus_per_node}
#SBATCH --time={spec.time}
#SBATCH --output={spec.output}
#SBATCH --requeue
#SBATCH --signal=TERM@{spec.signal_lead_s}
{partition}# Written by `hippo launch slurm`. One torchrun agent per node; they meet at the first node.
set -euo pipefail
NNODES=${{SLURM_NNODES:?SLURM_NNODES is not set: submit with sbatch}}
if command -v scontrol >/dev/null 2>&1; then
  HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
else
  HEAD_NODE=${{SLURM_JOB_NODELIST%%,*}}
fi
RDZV_ENDPOINT="$HEAD_NODE:{spec.rdzv_port}"
RDZV_ID="hippo-${{SLURM_JOB_ID:-local}}"
if command -v srun >/dev/null 2>&1; then SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1); else SRUN=(); fi
"${{SRUN[@]}}" {shlex.quote(python)} -m torch.distributed.run \\
  --nnodes "$NNODES" --nproc-per-node {spec.gpus_per_node} \\
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \\
  --max-restarts {spec.max_restarts} --shutdown-timeout {spec.shutdown_timeout_s} \\
  {worker}
"""
