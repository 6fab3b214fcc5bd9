"""Every use Hippo makes of DeepSpeed beyond its public API, in one place.

DeepSpeed is pinned to one minor release (pyproject.toml) because of what this module does; an
upgrade starts with `tests/parallel/test_deepspeed_compat.py`, which checks each item below against
the installed DeepSpeed and names the one that moved. Private uses (names DeepSpeed does not
document, or a patch of its classes), each with why no public route exists:

1. `DeepSpeedEngine._cast_module_mixed_precision`, wrapped while `deepspeed.initialize` runs
   (`ssm_dynamics_kept_in_fp32`): bf16 mode casts every parameter; the SSM dynamics must stay fp32
   and 0.19 has no per-parameter exception (`data_types.keep_in_fp32_modules` covers buffers only).
2. bf16 at ZeRO stage 0 (`BF16_Optimizer`): `engine._load_zero_checkpoint`,
   `engine._get_zero_param_shapes`, `engine._get_shared_params`, `optimizer.update_lp_params`
   (`bf16_zero0_client_state`, `load_checkpoint`): 0.19 writes that optimizer's state in ZeRO files
   but at stage 0 neither reads it back nor describes it for the universal converter.
   Items 1 and 2 exist because Hippo's bf16 is DeepSpeed's bf16 mode. DeepSpeed's public
   `torch_autocast` mode (fp32 parameters, bf16 compute; `BF16_AUTOCAST`) needs neither, but at
   ZeRO stage 0 its optimizer is the plain torch one, whose state DeepSpeed writes where
   `ds_to_universal` cannot read it: a bf16 ZeRO-0 run could no longer change layout on resume
   (`tests/pretrain/test_train.py::test_bf16_without_zero_continues_on_one_process_from_a_dp2_checkpoint`
   fails with "can't find *_optim_states.pt files"). BENCHMARKS.md compares both modes.
3. `PipelineModule._partition_layers` overridden, with `_topo`, `_set_bounds` and `parts`
   (`explicit_stages_pipeline`): no public hook for explicit stage bounds (deepspeedai/DeepSpeed#2974).
4. `PipelineEngine.pipeline_enable_backward_allreduce` set to False (`skip_single_replica_allreduce`):
   with one data-parallel rank DeepSpeed still flattens, "reduces" and copies back every gradient
   (~8% of a 125M model's CPU step); no config key turns it off.

Gone since issue 22: `argparse.Namespace(device_rank=...)` as `deepspeed.initialize(args=...)`
(`engine_device` sets DeepSpeed's documented input, LOCAL_RANK, while the engine is built).

Public but undocumented contracts Hippo relies on (checked by the same test, not counted above):
the client optimizer's `overflow` attribute read after `step` at ZeRO-0 (`engine.skipped_steps`),
`deepspeed.runtime.utils.partition_uniform/partition_balanced` (stage bounds as DeepSpeed computes
them), `PipelineModule` building a stage's `LayerSpec`s through their `build()` (`pipeline.layer_specs`
builds `HippoLM`'s own entries), the `PipelineModule` parameter names, the device numbered by
LOCAL_RANK, and `ds_to_universal`'s output layout `zero/<name>/fp32.pt`.

Also here, not private: `quiet`, which keeps DeepSpeed's start-up prints off a user's terminal, and
`engine_device`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from hippo.pretrain.models.ssm import is_ssm_dynamics

log = logging.getLogger(__name__)

BF16_AUTOCAST = "bf16-autocast"
"""Engine precision for DeepSpeed's public `torch_autocast` mode (fp32 parameters, bf16 compute):
not a run-config value (see item 2 above); `benchmarks/bench_bf16_modes.py` measures it."""


def precision_config(precision: str) -> dict[str, Any]:
    """The DeepSpeed config entries of an engine precision: "fp32", "bf16" (DeepSpeed's bf16 mode)
    or `BF16_AUTOCAST`."""
    if precision == BF16_AUTOCAST:
        return {"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    return {"bf16": {"enabled": precision == "bf16"}}


# ---------------------------------------------------------------------------------------- item 1
@contextlib.contextmanager
def ssm_dynamics_kept_in_fp32(module: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside: DeepSpeed's bf16 mode casts every parameter of `module` to bf16 except the SSM
    dynamics, which stay fp32 (checked on the way out).

    bf16 cannot hold them: `A_imag` ~ pi n reaches ~97, where bf16 values are 0.5 apart, and
    `log_dt` ~ -4.6 keeps dt to ~3%, so the model would run on rounded dynamics and lose updates
    of ~lr per step (the authors and mamba_ssm keep these in fp32 too). Left fp32, they get fp32
    gradients from autograd, an exact fp32 master copy in DeepSpeed's optimizer (which flattens
    each parameter group in its own dtype) and the master's updates unrounded. One bf16 rounding
    remains: DeepSpeed's gradient buffers (BF16 optimizer accumulation, ZeRO reduction buckets and
    partitions) have one dtype for all parameters, so these gradients reach the master rounded to
    bf16 (relative 2^-9, like every other gradient); 0.19 has no per-parameter way around it.

    Private item 1: the cast method is wrapped while the engine is built; the check after the build
    fails loudly should a DeepSpeed upgrade move the cast elsewhere. Not re-entrant (a class
    attribute, restored on the way out). Each optimizer group must be all SSM dynamics or none: a
    mixed group would be flattened into one fp32 tensor.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    dynamics = [p for p in module.parameters() if is_ssm_dynamics(p)]
    ids = {id(p) for p in dynamics}
    for group in optimizer.param_groups:
        if len({id(p) in ids for p in group["params"]}) > 1:
            raise ValueError(
                f"optimizer parameter group {group.get('name', '?')!r} mixes SSM-dynamics parameters (kept in fp32 "
                "under bf16) with others; DeepSpeed flattens a group into one tensor of one dtype: give them a "
                "group of their own (as pretrain.optim.parameter_groups does)"
            )
    cast = DeepSpeedEngine._cast_module_mixed_precision

    def cast_all_but_ssm_dynamics(engine, *args, **kwargs):
        kept = [(p, p.data) for p in engine.module.parameters() if id(p) in ids]
        cast(engine, *args, **kwargs)
        for p, data in kept:
            p.data = data

    DeepSpeedEngine._cast_module_mixed_precision = cast_all_but_ssm_dynamics
    try:
        yield
    finally:
        DeepSpeedEngine._cast_module_mixed_precision = cast
    if lowered := sorted({str(p.dtype) for p in dynamics} - {"torch.float32"}):
        raise RuntimeError(f"SSM-dynamics parameters are {lowered} in the bf16 engine, not fp32: DeepSpeed no longer "
                           "casts through DeepSpeedEngine._cast_module_mixed_precision; update "
                           "hippo.parallel.deepspeed_compat.ssm_dynamics_kept_in_fp32")


# ---------------------------------------------------------------------------------------- item 2
class MissingOptimizerState(RuntimeError):
    """A bf16 ZeRO-0 checkpoint without its optimizer files."""


def _bf16_without_zero(engine) -> bool:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(engine.optimizer, BF16_Optimizer) and not engine.zero_optimization()


def bf16_zero0_client_state(engine) -> dict[str, Any]:
    """`client_state` for `engine.save_checkpoint`: what DeepSpeed 0.19 leaves out of
    `mp_rank_*_model_states.pt` for bf16 at ZeRO stage 0 (see `load_checkpoint`): the parameter
    shapes and shared parameters it writes there when ZeRO is on, which the universal converter
    (`param_shapes`) needs to read the bf16 ZeRO files. Empty in every other mode."""
    if not _bf16_without_zero(engine):
        return {}
    return {"param_shapes": engine._get_zero_param_shapes(), "shared_params": engine._get_shared_params()}


def load_checkpoint(engine, folder: Path, tag: str) -> str | None:
    """`engine.load_checkpoint(folder, tag)`, with the optimizer state of bf16 without ZeRO restored.
    Returns None where DeepSpeed found nothing to load (its own convention), else a description.

    DeepSpeed 0.19 runs bf16 at ZeRO stage 0 through `BF16_Optimizer`, which partitions its fp32
    master weights and moments over DP like ZeRO-1 and is saved like it: one
    `bf16_zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt` per DP rank (`save_zero_checkpoint` holds
    for any optimizer with a DP group). `load_checkpoint` reads those files only when ZeRO is on; at
    stage 0 it hands `BF16_Optimizer.load_state_dict` the one state dict of
    `mp_rank_*_model_states.pt` where that expects the per-DP-rank list of the ZeRO files
    (`KeyError: 0` in `_load_legacy_checkpoint`). So the engine loads all but the optimizer here
    (module, scheduler, counters), then the optimizer from the ZeRO files through DeepSpeed's own
    ZeRO loader, with the saved fp32 masters (`zero_optimization.load_from_fp32_weights`, default
    true) as at ZeRO-1: the run continues bit for bit. A universal checkpoint goes the same way.
    """
    bf16_without_zero = _bf16_without_zero(engine)
    load_path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=not bf16_without_zero)
    if load_path is None:
        return None
    if not bf16_without_zero:
        return load_path
    if not engine._load_zero_checkpoint(str(folder), tag, load_optimizer_states=True):
        raise MissingOptimizerState("DeepSpeed found no bf16 optimizer state (bf16_zero_pp_rank_* files) to load")
    if engine.load_universal_checkpoint():  # the bf16 weights come from the loaded fp32 masters
        engine.optimizer.update_lp_params()
    return load_path


# ---------------------------------------------------------------------------------------- item 3
def explicit_stages_pipeline(bounds: Callable[[], list[int]], **kwargs) -> nn.Module:
    """A `PipelineModule` whose stage s runs layers [bounds()[s], bounds()[s + 1])."""
    from deepspeed.pipe import PipelineModule

    class ExplicitStagesPipeline(PipelineModule):
        def _partition_layers(self, method: str = "uniform") -> None:
            self.parts = bounds()
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return ExplicitStagesPipeline(**kwargs)


def deepspeed_partition(parts: int, *, items: int | None = None, weights: list[int] | None = None) -> list[int]:
    """Stage bounds as DeepSpeed's `partition_method` "uniform" (`items`) or "parameters" (`weights`)
    computes them (a contract: `deepspeed.runtime.utils` is importable but undocumented)."""
    from deepspeed.runtime import utils as ds_utils

    if weights is None:
        return ds_utils.partition_uniform(num_items=items, num_parts=parts)
    return ds_utils.partition_balanced(weights=weights, num_parts=parts)


# ---------------------------------------------------------------------------------------- item 4
def skip_single_replica_allreduce(engine) -> None:
    """Turn off a pipeline engine's gradient all-reduce (only correct with one data-parallel rank
    and no ZeRO partitions: the caller decides)."""
    if not hasattr(engine, "pipeline_enable_backward_allreduce"):
        raise RuntimeError("DeepSpeed's pipeline engine no longer has pipeline_enable_backward_allreduce: update "
                           "hippo.parallel.deepspeed_compat.skip_single_replica_allreduce")
    engine.pipeline_enable_backward_allreduce = False


# ---------------------------------------------------------------------------------------- device
@contextlib.contextmanager
def engine_device(device: torch.device) -> Iterator[None]:
    """Inside: a DeepSpeed engine built binds `device` (not private; no effect on CPU).

    DeepSpeed binds the accelerator device numbered by the LOCAL_RANK environment variable (its
    documented input, read by `deepspeed.initialize`). Where each task sees one GPU (SLURM
    `--gpus-per-task`) a rank's LOCAL_RANK of 5 names a device it cannot see: LOCAL_RANK then names
    the rank's own device while the engine is built, and is restored after. Not re-entrant (the
    process environment)."""
    saved = os.environ.get("LOCAL_RANK")
    if device.type != "cuda" or saved == str(device.index or 0):
        yield
        return
    os.environ["LOCAL_RANK"] = str(device.index or 0)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = saved


# ---------------------------------------------------------------------------------------- output
DEEPSPEED_NOISE = (
    # Hippo passes its own AdamW with `zero_allow_untested_optimizer` on purpose (FiniteStepAdamW).
    "You are using ZeRO with an untested optimizer",
)


class _DropNoise(logging.Filter):
    """Drops DeepSpeed log records that tell a Hippo user nothing (unless Hippo logs at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("hippo").isEnabledFor(logging.DEBUG):
            return True
        return not any(noise in record.getMessage() for noise in DEEPSPEED_NOISE)


_NOISE_FILTER = _DropNoise()

BROADCAST_BACKWARD_WARNING = r"c10d::broadcast_: an autograd kernel was not registered"
"""torch's warning, at the first backward of a pipeline with tied weights on two stages: the
`PipelineModule` broadcasts the tied embedding in place at construction (`_synchronize_tied_weights`),
which autograd records without a kernel. The gradients are right (tests/parallel/test_parity.py:
PP 2 equals one process), so the warning ("may lead to silently incorrect behavior") only alarms."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """DeepSpeed's start-up `print`s (`SEED_LAYERS=...`, `Using topology: ...`, each stage's layer
    list, "... built successfully") go to Hippo's DEBUG log instead of stdout, and its known
    meaningless warnings (`DEEPSPEED_NOISE`, `BROADCAST_BACKWARD_WARNING`) are dropped;
    `hippo --debug` shows them all."""
    from hippo.parallel.runtime import import_deepspeed

    ds_logger = import_deepspeed().utils.logger
    if _NOISE_FILTER not in ds_logger.filters:
        ds_logger.addFilter(_NOISE_FILTER)
    if not logging.getLogger("hippo").isEnabledFor(logging.DEBUG):  # for the whole process: it comes later
        warnings.filterwarnings("ignore", message=BROADCAST_BACKWARD_WARNING, category=UserWarning)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        if text := captured.getvalue().strip():
            log.debug("DeepSpeed said:\n%s", text)
