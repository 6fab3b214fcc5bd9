"""`hippo.parallel.deepspeed_compat` against the installed DeepSpeed: every private use it lists
(and every undocumented contract) is still where it was. An upgrade that moves one fails here,
naming the item and the Hippo function to update, before a training run finds out."""

from __future__ import annotations

import inspect
import logging

import pytest

from hippo.parallel.runtime import import_deepspeed

import_deepspeed()  # picks the CPU accelerator on a machine without a GPU

from deepspeed.pipe import PipelineModule, TiedLayerSpec  # noqa: E402
from deepspeed.runtime import utils as ds_utils  # noqa: E402
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.pipe.engine import PipelineEngine  # noqa: E402


def _source(obj) -> str:
    return inspect.getsource(obj)


def _has(cls, *names: str) -> bool:
    return all(callable(getattr(cls, n, None)) for n in names)


# (item, what Hippo relies on, the compat function that relies on it, check)
PRIVATE = [
    ("1", "DeepSpeedEngine._cast_module_mixed_precision casts the module in __init__",
     "ssm_dynamics_kept_in_fp32",
     lambda: _has(DeepSpeedEngine, "_cast_module_mixed_precision")
     and "self._cast_module_mixed_precision(" in _source(DeepSpeedEngine)),
    ("2", "DeepSpeedEngine._load_zero_checkpoint(load_dir, tag, load_optimizer_states=...)", "load_checkpoint",
     lambda: _has(DeepSpeedEngine, "_load_zero_checkpoint")
     and {"load_dir", "tag", "load_optimizer_states"} <= set(inspect.signature(DeepSpeedEngine._load_zero_checkpoint).parameters)),
    ("2", "DeepSpeedEngine._get_zero_param_shapes and _get_shared_params", "bf16_zero0_client_state",
     lambda: _has(DeepSpeedEngine, "_get_zero_param_shapes", "_get_shared_params")),
    ("2", "BF16_Optimizer.update_lp_params", "load_checkpoint", lambda: _has(BF16_Optimizer, "update_lp_params")),
    ("3", "PipelineModule.__init__ calls self._partition_layers(...), which sets self.parts and _set_bounds",
     "explicit_stages_pipeline",
     lambda: _has(PipelineModule, "_partition_layers", "_set_bounds")
     and "self._partition_layers(" in _source(PipelineModule.__init__) and "self._topo" in _source(PipelineModule.__init__)
     and "self.parts" in _source(PipelineModule._partition_layers)),
    ("4", "PipelineEngine.pipeline_enable_backward_allreduce gates its gradient all-reduce",
     "skip_single_replica_allreduce",
     lambda: "self.pipeline_enable_backward_allreduce" in _source(PipelineEngine.__init__)
     and "self.pipeline_enable_backward_allreduce" in _source(PipelineEngine._exec_reduce_grads)),
]

CONTRACTS = [
    ("the engine binds the accelerator device numbered by LOCAL_RANK (tests/parallel/test_device.py runs it)",
     "engine_device",
     lambda: "os.environ['LOCAL_RANK']" in _source(DeepSpeedEngine._configure_with_arguments)
     and "set_device(device_rank)" in _source(DeepSpeedEngine._set_distributed_vars)),
    ("the client optimizer's `overflow` decides a skipped step at ZeRO-0", "parallel.engine.FiniteStepAdamW",
     lambda: "overflow" in _source(DeepSpeedEngine._take_model_step) and "skipped_steps" in _source(DeepSpeedEngine)),
    ("deepspeed.runtime.utils.partition_uniform / partition_balanced", "deepspeed_partition",
     lambda: {"num_items", "num_parts"} <= set(inspect.signature(ds_utils.partition_uniform).parameters)
     and {"weights", "num_parts"} <= set(inspect.signature(ds_utils.partition_balanced).parameters)),
    ("PipelineModule builds a stage's (Tied)LayerSpec entries by calling their build(); TiedLayerSpec takes key, "
     "forward_fn and tied_weight_attr", "parallel.pipeline.layer_specs",
     lambda: "layer.build()" in _source(PipelineModule._build)
     and {"key", "forward_fn", "tied_weight_attr"} <= set(inspect.signature(TiedLayerSpec).parameters)),
]


@pytest.mark.parametrize("item, what, user, check", PRIVATE, ids=[f"item{i}-{u}" for i, _, u, _ in PRIVATE])
def test_private_deepspeed_api_is_still_there(item, what, user, check):
    import deepspeed

    assert check(), (f"DeepSpeed {deepspeed.__version__} changed what hippo.parallel.deepspeed_compat.{user} relies "
                     f"on (private item {item}: {what}); update that function and its docstring entry")


@pytest.mark.parametrize("what, user, check", CONTRACTS, ids=[u for _, u, _ in CONTRACTS])
def test_deepspeed_contract_still_holds(what, user, check):
    import deepspeed

    assert check(), f"DeepSpeed {deepspeed.__version__} changed {what}, which {user} relies on"


def test_quiet_sends_prints_to_the_debug_log(capsys, caplog):
    from hippo.parallel.deepspeed_compat import quiet

    with caplog.at_level(logging.DEBUG, logger="hippo"):
        with quiet():
            print("SEED_LAYERS=False BASE_SEED=1234 SEED_FN=None")
    assert "SEED_LAYERS" not in capsys.readouterr().out
    assert "SEED_LAYERS=False" in caplog.text


def test_quiet_drops_the_untested_optimizer_warning_only():
    from deepspeed.utils import logger as ds_logger

    from hippo.parallel.deepspeed_compat import quiet

    with quiet():
        pass

    def shown(message: str) -> bool:
        record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)
        return all(f.filter(record) for f in ds_logger.filters)

    assert not shown("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
    assert shown("something that matters")


def test_precision_configs():
    """fp32 and bf16 are DeepSpeed's modes; BF16_AUTOCAST is its torch_autocast (benchmarks only)."""
    from hippo.parallel.deepspeed_compat import BF16_AUTOCAST, precision_config

    assert precision_config("fp32") == {"bf16": {"enabled": False}}
    assert precision_config("bf16") == {"bf16": {"enabled": True}}
    assert precision_config(BF16_AUTOCAST)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
