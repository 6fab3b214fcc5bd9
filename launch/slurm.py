"""An sbatch script: one torchrun agent per node (srun), rendezvous on the first node, requeue.

On preemption SLURM sends SIGTERM to the job step: `hippo train` finishes its step, writes a
checkpoint and exits; `--requeue` puts the job back in the queue and the same command resumes
from the latest checkpoint. Without `srun` on the PATH (a local test) the script runs the one
node's torchrun directly, reading the same SLURM_* variables.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass

from hippo.pretrain.config import ConfigError


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

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {self.nodes}, {self.gpus_per_node}")


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
#SBATCH --signal=TERM@120
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
  --max-restarts {spec.max_restarts} \\
  {worker}
"""
