"""Every use Hippo makes of MLflow beyond its public API, in one place.

mlflow is pinned below the next minor release (pyproject.toml); `tests/pretrain/test_mlflow_compat.py`
checks the item below against the installed MLflow and names it if it moved. Private uses:

1. `mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` (`system_metrics_monitor`):
   MLflow's CPU/memory/disk/network (and NVIDIA GPU) sampler. Its public switch,
   `mlflow.start_run(log_system_metrics=True)`, starts the same monitor only for the process-global
   tracking URI and active run, which `tracking.Tracker` deliberately leaves alone (a user's own
   MLflow calls in the same process keep theirs).

Not private: `MAX_PARAM_VAL_LENGTH` and `MAX_TAG_VAL_LENGTH` below are the limits MLflow documents
for its REST API (the test checks that MLflow still enforces these); Hippo sends its records through
its own thread (`tracking.Tracker`), so it needs neither `RunOperations._operation_futures` nor the
merging behaviour of MLflow's asynchronous queue, as it did before issue 22.
"""

from __future__ import annotations

from typing import Any

MAX_PARAM_VAL_LENGTH = 6000
"""Longest param value MLflow stores (its REST API's documented limit)."""
MAX_TAG_VAL_LENGTH = 8000
"""Longest tag value MLflow stores (its REST API's documented limit)."""


def system_metrics_monitor(run_id: str, *, resume_logging: bool, tracking_uri: str) -> Any:
    """MLflow's system-metrics sampler for `run_id` at `tracking_uri`, not started (private item 1)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(run_id, resume_logging=resume_logging, tracking_uri=tracking_uri)
