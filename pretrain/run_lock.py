"""A run folder has one owner: the lock rank 0 of a `hippo train` holds while it runs.

`flock` is not reliable across the nodes of a shared filesystem (NFS, Lustre), so the lock is a
file created with O_EXCL (atomic there too), naming its holder (host, pid, job) and refreshed by a
heartbeat. A lock is stale, and taken over, when its holder is gone: on the same host its pid has
exited; elsewhere its heartbeat is older than `STALE_AFTER_S`, or, for a holder of the same job (a
torchrun restart or a SLURM requeue of this run on another node), has stopped for two beats. A
live holder with a fresh heartbeat is never taken over, whatever job it names: two jobs that share
an id (a reused `--rdzv-id`) must not both train in one folder.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".hippo_train.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0
"""A holder on another host whose heartbeat is this old is taken to be dead (>> HEARTBEAT_S)."""


class RunLockedError(RuntimeError):
    """Another live `hippo train` owns the run folder; the message names its host and pid."""

    same_on_every_rank = True
    """Every rank of a job raises it with rank 0's message: the CLI reports it once (rank 0)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str | None
    """The scheduler's job identity (torchrun run id, SLURM job id): restarts of one job share it."""
    started: float

    @classmethod
    def me(cls) -> Holder:
        job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
        return cls(socket.gethostname(), os.getpid(), job, time.time())


class RunLock:
    """Held by one process; `release` (or the process's end) gives it up."""

    def __init__(self, run_dir: Path, *, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        for _ in range(3):  # a stale lock removed by us or by a racing taker: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(asdict(self.holder), f)
            except OSError:  # a full disk: an empty lock file would block the folder as "unreadable"
                self.path.unlink(missing_ok=True)
                raise
            atexit.register(self.release)  # also when the run fails before it could release
            self._thread = threading.Thread(target=self._beat, name="hippo-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLockedError(f"{self.path}: could not take the run folder's lock (another trainer keeps taking it)")

    def check_free(self) -> None:
        """Raise RunLockedError if a live trainer holds the folder; takes nothing. A launcher's
        check before it starts a job, so a second job is refused once, before any rank starts."""
        if not self.path.exists():
            return
        other = self._read()
        if other is None:
            if self._age() < self.stale_after_s:
                raise RunLockedError(f"{self.path} is held (unreadable holder); if no trainer runs, delete the file")
        elif not self._is_stale(other):
            raise RunLockedError(self._in_use(other))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._read() == self.holder:
            self.path.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        other = self._read()
        if other is None:  # unreadable: half-written by a racing taker, or damaged; judge by age
            if self._age() < self.stale_after_s:
                raise RunLockedError(f"{self.path} is held (unreadable holder); if no trainer runs, delete the file")
        elif not self._is_stale(other):
            raise RunLockedError(self._in_use(other))
        else:
            log.warning("taking over the run folder's lock from pid %s on %s (gone)", other.pid, other.host)
        try:
            os.replace(self.path, self.path.with_name(f"{LOCK_FILE}.stale.{self.holder.pid}"))
            self.path.with_name(f"{LOCK_FILE}.stale.{self.holder.pid}").unlink()
        except FileNotFoundError:
            pass  # another taker was first; the next O_EXCL attempt decides

    def _in_use(self, other: Holder) -> str:
        started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(other.started))
        return (f"run folder {self.path.parent} is in use by hippo train pid {other.pid} on host {other.host} "
                f"(started {started}); use another --run-dir, or stop that run first")

    def _is_stale(self, other: Holder) -> bool:
        """On this host the pid decides. Elsewhere only the heartbeat can: a holder of this job
        (its restart or requeue) is gone once it stops beating; another job's after `stale_after_s`."""
        if other.host == self.holder.host:
            return not _pid_alive(other.pid)
        if other.job is not None and other.job == self.holder.job:
            return self._heartbeat_stopped()
        return self._age() > self.stale_after_s

    def _heartbeat_stopped(self) -> bool:
        """Whether the lock file goes two heartbeats without a beat, watched for at most that long
        (plus a margin): a restarted job's old holder has just died, so this decides within seconds."""
        limit = 2 * self.heartbeat_s
        deadline = time.monotonic() + limit + self.heartbeat_s / 2
        while self._age() < limit:
            if time.monotonic() > deadline:
                return False
            time.sleep(min(1.0, self.heartbeat_s / 4))
        return True

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.error("%s disappeared: another trainer may now use this run folder", self.path)
                return


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
