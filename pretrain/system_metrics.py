"""Hippo's system-metrics sampler: CPU and memory use of the host, and the GPU memory of this
process's device, every `SAMPLE_INTERVAL_S`, handed to a callback (the run's `tracking.Tracker`,
so the samples share its sending thread and, with the server down, its pending file).

Hippo's own rather than MLflow's `SystemMetricsMonitor` (an internal module of MLflow, whose public
switch binds it to the process-global run): the names are MLflow's (`system/...`), so a dashboard
made for either reads both. GPU utilization (which needs NVML) is not sampled.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 10.0
"""Seconds between samples (MLflow's default)."""
MIB = 2**20


def sample() -> dict[str, float]:
    """One sample: host CPU % since the previous call, host memory, this process's resident memory,
    and the current CUDA device's memory (only where this process already uses CUDA: querying
    another device would open a context, and take memory, there)."""
    import psutil

    memory = psutil.virtual_memory()
    out = {
        "system/cpu_utilization_percentage": psutil.cpu_percent(interval=None),
        "system/system_memory_usage_megabytes": memory.used / MIB,
        "system/system_memory_usage_percentage": memory.percent,
        "system/process_memory_rss_megabytes": psutil.Process().memory_info().rss / MIB,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        i = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(i)
        out[f"system/gpu_{i}_memory_usage_megabytes"] = (total - free) / MIB
        out[f"system/gpu_{i}_memory_usage_percentage"] = 100.0 * (total - free) / total
        out[f"system/gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / MIB
    return out


class SystemMetricsSampler:
    """A daemon thread calling `log(sample(), step)` every `interval_s` seconds, steps counting up
    from `first_step` (a resumed run continues its own), until `stop()`."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], None], *, first_step: int = 0,
                 interval_s: float | None = None) -> None:
        self._log = log_metrics
        self._step = first_step
        self._interval = SAMPLE_INTERVAL_S if interval_s is None else interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hippo-system-metrics", daemon=True)

    def start(self) -> None:
        sample()  # psutil's CPU % counts from its previous call: the first sample then covers one interval
        self._thread.start()

    def stop(self) -> None:
        """Stops sampling; returns once the thread has logged its last sample."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._log(sample(), self._step)
            except Exception:  # a sample is never worth a training run
                log.warning("system metrics sampling failed; sampling stops", exc_info=True)
                return
            self._step += 1
