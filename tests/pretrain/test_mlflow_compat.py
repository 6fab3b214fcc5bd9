"""`hippo.pretrain.mlflow_compat` against the installed MLflow: the value limits Hippo truncates to
are the ones MLflow enforces (Hippo uses no private MLflow API)."""

from __future__ import annotations

import mlflow

from hippo.pretrain import mlflow_compat


def test_value_limits_are_mlflows():
    from mlflow.utils import validation

    assert (mlflow_compat.MAX_PARAM_VAL_LENGTH, mlflow_compat.MAX_TAG_VAL_LENGTH) == (
        validation.MAX_PARAM_VAL_LENGTH, validation.MAX_TAG_VAL_LENGTH), (
        f"MLflow {mlflow.__version__} changed its param/tag value limits: update hippo.pretrain.mlflow_compat")
