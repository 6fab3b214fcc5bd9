"""Which checkpoints may continue under another layout or ZeRO stage, decided before any
conversion: an fp32 ZeRO-0 side is refused in one line (DeepSpeed 0.19 keeps that optimizer state
where only the same engine reads it: `Checkpoint.move_problem`); every other move goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

import hippo.pretrain.checkpoint as ckpt_mod
from hippo.parallel.layout import ParallelLayout
from hippo.pretrain.checkpoint import Checkpoint, CheckpointError, CheckpointManager, SavedState


def checkpoint(tmp_path: Path, *, data: int, zero_stage: int, precision: str = "fp32") -> Checkpoint:
    state = SavedState(step=8, data={}, skipped_steps=0, mlflow_run_id=None, reason="interval",
                       config={"train": {"precision": precision}},
                       layout={"world_size": data, "tensor": 1, "pipeline": 1, "data": data, "zero_stage": zero_stage})
    return Checkpoint(tmp_path / "checkpoints" / "global_step8", state)


def layout(*, data: int, zero_stage: int) -> ParallelLayout:
    return ParallelLayout(world_size=data, tensor=1, pipeline=1, data=data, micro_batch_size=1, grad_accum_steps=1,
                          zero_stage=zero_stage)


@pytest.fixture
def no_conversion(monkeypatch):
    """prepare_load without ranks or a converter: records the conversions it would start."""
    started = []
    monkeypatch.setattr(ckpt_mod.dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(CheckpointManager, "convert_to_universal", staticmethod(lambda ckpt, out=None: started.append(ckpt)))
    return started


@pytest.mark.parametrize("saved, now", [
    ((1, 0), (2, 1)),  # one process at ZeRO-0 -> DP 2 ZeRO-1
    ((2, 1), (1, 0)),  # DP 2 ZeRO-1 -> one process at ZeRO-0
    ((1, 0), (1, 1)),  # same layout, ZeRO-0 -> ZeRO-1
    ((1, 1), (1, 0)),  # same layout, ZeRO-1 -> ZeRO-0
    ((2, 0), (4, 0)),  # ZeRO-0 on both sides, another data-parallel size
])
def test_an_fp32_zero0_side_is_refused_in_one_line_before_any_conversion(tmp_path, no_conversion, saved, now):
    ckpt = checkpoint(tmp_path, data=saved[0], zero_stage=saved[1])
    with pytest.raises(CheckpointError) as e:
        CheckpointManager(ckpt.folder).prepare_load(ckpt, layout(data=now[0], zero_stage=now[1]), precision="fp32")
    message = str(e.value)
    assert "\n" not in message and f"parallel.zero_stage={saved[1]} (fp32)" in message
    assert f"parallel.zero_stage={now[1]} (fp32)" in message and f"data={saved[0]}" in message
    assert no_conversion == []


@pytest.mark.parametrize("saved, now, precision, universal", [
    ((1, 0), (1, 0), "fp32", False),  # the same engine: loads directly
    ((1, 1), (2, 1), "fp32", True),   # ZeRO files: universal
    ((2, 1), (2, 2), "fp32", False),  # ZeRO-1 -> ZeRO-2: the same files
    ((1, 0), (2, 1), "bf16", True),   # bf16 ZeRO-0 writes ZeRO files (deepspeed_compat item 2)
    ((2, 1), (1, 0), "bf16", True),
])
def test_other_moves_go_on(tmp_path, no_conversion, saved, now, precision, universal):
    ckpt = checkpoint(tmp_path, data=saved[0], zero_stage=saved[1], precision=precision)
    manager = CheckpointManager(ckpt.folder)
    assert manager.prepare_load(ckpt, layout(data=now[0], zero_stage=now[1]), precision=precision) is universal
    assert no_conversion == ([ckpt] if universal else [])
