"""`hippo.pretrain.mlflow_compat` against the installed MLflow: its private use is still there, and
the value limits Hippo truncates to are the ones MLflow enforces."""

from __future__ import annotations

import inspect

import mlflow

from hippo.pretrain import mlflow_compat


def test_system_metrics_monitor_is_still_there():
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:
        raise AssertionError(f"MLflow {mlflow.__version__} moved SystemMetricsMonitor: update "
                             "hippo.pretrain.mlflow_compat.system_metrics_monitor (private item 1)") from e
    params = set(inspect.signature(SystemMetricsMonitor).parameters)
    assert {"run_id", "resume_logging", "tracking_uri"} <= params, (
        f"MLflow {mlflow.__version__} changed SystemMetricsMonitor's arguments ({sorted(params)}): update "
        "hippo.pretrain.mlflow_compat.system_metrics_monitor")
    assert callable(getattr(SystemMetricsMonitor, "start", None)) and callable(getattr(SystemMetricsMonitor, "finish", None))


def test_value_limits_are_mlflows():
    from mlflow.utils import validation

    assert (mlflow_compat.MAX_PARAM_VAL_LENGTH, mlflow_compat.MAX_TAG_VAL_LENGTH) == (
        validation.MAX_PARAM_VAL_LENGTH, validation.MAX_TAG_VAL_LENGTH), (
        f"MLflow {mlflow.__version__} changed its param/tag value limits: update hippo.pretrain.mlflow_compat")
