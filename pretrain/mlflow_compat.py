"""What Hippo relies on in MLflow beyond its client calls, in one place.

Private uses: none. `tests/pretrain/test_mlflow_compat.py` checks the values below against the
installed MLflow. Gone since issue 22: `RunOperations._operation_futures` and the merging behaviour
of MLflow's asynchronous queue (Hippo sends its records through its own thread, `tracking.Tracker`),
and `mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` (Hippo samples CPU, memory
and GPU memory itself, `pretrain.system_metrics`, and logs them through the same thread).

Not private: `MAX_PARAM_VAL_LENGTH` and `MAX_TAG_VAL_LENGTH` are the limits MLflow documents for its
REST API (the test checks that MLflow still enforces these).
"""

from __future__ import annotations

MAX_PARAM_VAL_LENGTH = 6000
"""Longest param value MLflow stores (its REST API's documented limit)."""
MAX_TAG_VAL_LENGTH = 8000
"""Longest tag value MLflow stores (its REST API's documented limit)."""
