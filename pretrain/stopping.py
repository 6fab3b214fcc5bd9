"""Why a training run stops, and the stop request schedulers send (SIGTERM/SIGINT)."""

from __future__ import annotations

import enum
import logging
import signal
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopReason(enum.StrEnum):
    COMPLETED = "completed"
    SIGNAL = "signal"
    """SIGTERM/SIGINT: stopped after the step with a checkpoint (preemption)."""
    EXIT_INTERVAL = "exit interval"
    """`train.exit_interval`: a job-length limit."""
    NON_FINITE = "non-finite"
    """`train.max_skipped_steps` non-finite steps in a row; the last good state was saved."""


class StopRequest:
    """SIGTERM/SIGINT set a flag; ranks agree on it every step, so all stop after the same one."""

    def __init__(self) -> None:
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.signalled = True

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank once any rank was signalled."""
        flag = torch.tensor(float(self.signalled), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
