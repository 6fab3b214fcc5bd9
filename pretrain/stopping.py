"""Why a training run stops, and the stop request schedulers send (SIGTERM/SIGINT)."""

from __future__ import annotations

import enum
import logging
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopReason(enum.StrEnum):
    COMPLETED = "completed"
    SIGNAL = "signal"
    """SIGTERM/SIGINT: stopped after the step with a checkpoint (preemption)."""
    EXIT_INTERVAL = "exit interval"
    """`train.exit_interval`: a job-length limit in steps."""
    TIME_LIMIT = "time limit"
    """`train.time_limit`: the next step and checkpoint would not fit in the wall-clock limit."""
    NON_FINITE = "non-finite"
    """`train.max_skipped_steps` non-finite steps in a row; the last good state was saved."""


class StopRequest:
    """SIGTERM/SIGINT set a flag; ranks agree on it every step, so all stop after the same one."""

    def __init__(self) -> None:
        self.signum = 0
        """The signal received (0: none); once agreed, the job's (the highest any rank received)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    @property
    def signalled(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
            self.signum = signum

    def agreed(self, device: torch.device, *, time_up: bool = False) -> StopReason | None:
        """Collective: SIGNAL once any rank was signalled (every rank then exits with the same
        code), else TIME_LIMIT once any rank's clock says so, else None; the same answer on every rank."""
        flags = torch.tensor([float(self.signum), float(time_up)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, out_of_time = flags.tolist()
        if signum:
            self.signum = int(signum)
            return StopReason.SIGNAL
        return StopReason.TIME_LIMIT if out_of_time else None


class WallClock:
    """Whether one more step and a checkpoint still fit in `limit` seconds from `start`."""

    def __init__(self, limit: float, start: float) -> None:
        self.limit, self.start = limit, start

    def time_up(self, step_seconds: float, checkpoint_seconds: float) -> bool:
        if not self.limit:
            return False
        return time.monotonic() - self.start + step_seconds + checkpoint_seconds >= self.limit
