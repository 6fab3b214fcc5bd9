"""torchrun with a c10d rendezvous: one agent per node, restarts from the latest checkpoint."""

from __future__ import annotations

import re
import shlex
import sys
import uuid
from dataclasses import dataclass

from hippo.pretrain.config import ConfigError


@dataclass(frozen=True)
class TorchrunSpec:
    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    """HOST:PORT of the rendezvous (the first node); every agent names the same one."""
    max_restarts: int = 3
    """Worker-group restarts after a rank dies; each restart resumes from the latest checkpoint."""
    rdzv_id: str | None = None
    """The job's id (TORCHELASTIC_RUN_ID: the run lock's job identity), the same across its elastic
    restarts. None: a fresh one per job on one node; on several nodes, where every agent must name
    the same id, one derived from the endpoint (pass the scheduler's job id to tell jobs apart)."""
    local_addr: str | None = None
    """The address this node's ranks are reached at (default: its hostname's)."""
    rdzv_host: bool = False
    """This agent hosts the rendezvous store. torchrun decides that by matching the endpoint to
    the machine's hostname; say so where the endpoint is another address of this node."""

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ConfigError(f"--nnodes and --nproc-per-node must be >= 1, got {self.nnodes}, {self.nproc_per_node}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.rdzv_id is None:
            object.__setattr__(self, "rdzv_id", default_rdzv_id(self.nnodes, self.rdzv_endpoint))


def default_rdzv_id(nnodes: int, endpoint: str) -> str:
    """Unique per job on one node; on several nodes the agents cannot agree on a random id, so it
    names the rendezvous endpoint, which only one job can hold at a time."""
    if nnodes == 1:
        return f"hippo-{uuid.uuid4().hex[:12]}"
    return "hippo-" + re.sub(r"[^A-Za-z0-9]+", "-", endpoint)


def torchrun_command(spec: TorchrunSpec, worker_argv: list[str], python: str = sys.executable) -> list[str]:
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(spec.nnodes), "--nproc-per-node", str(spec.nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint, "--rdzv-id", spec.rdzv_id,
        "--max-restarts", str(spec.max_restarts),
        *(["--rdzv-conf", "is_host=1"] if spec.rdzv_host else []),
        *(["--local-addr", spec.local_addr] if spec.local_addr else []),
        *worker_argv,
    ]


def show(cmd: list[str]) -> str:
    return shlex.join(cmd)
