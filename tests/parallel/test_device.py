"""Each rank binds a GPU it can see: LOCAL_RANK modulo the visible count (one GPU per SLURM task
under `--gpus-per-task` leaves LOCAL_RANK 5 with the single device 0). CUDA is mocked: these run
on CPU-only machines too."""

from __future__ import annotations

import pytest
import torch

from hippo.parallel import groups
from hippo.parallel.layout import ParallelLayout
from hippo.parallel.runtime import bind_device, device, import_deepspeed


def _visible_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> list[torch.device]:
    """Pretend `count` GPUs are visible; returns the devices `torch.cuda.set_device` was given."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(_cuda(d)))
    return chosen


def _cuda(d: torch.device | int) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


@pytest.mark.parametrize("local_rank,visible", [(0, 1), (5, 1), (5, 8), (3, 2), (7, 4)])
def test_the_bound_device_is_one_the_rank_sees(monkeypatch, local_rank, visible):
    chosen = _visible_gpus(monkeypatch, visible)
    bound = bind_device(local_rank)
    assert bound.type == "cuda" and 0 <= bound.index < visible
    assert bound.index == local_rank % visible  # all GPUs visible: the local rank itself
    assert chosen == [bound] and device(local_rank) == bound


def test_without_a_gpu_the_device_is_the_cpu_and_cuda_is_not_touched(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: pytest.fail("device_count called without a GPU"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device called without a GPU"))
    assert bind_device(3) == torch.device("cpu")


class _Stop(Exception):
    pass


def test_init_parallel_binds_a_visible_gpu_when_each_task_sees_one(monkeypatch):
    """LOCAL_RANK 5 in a task that sees one GPU: init_parallel makes cuda:0 current, not cuda:5."""
    import_deepspeed()  # imported for real (CPU accelerator) before CUDA is faked
    chosen = _visible_gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setattr(groups.dist, "is_initialized", lambda: False)

    def stop() -> None:
        raise _Stop  # the rendezvous comes after the device is bound: nothing further is needed here

    monkeypatch.setattr(groups, "_init_process_group", stop)
    with pytest.raises(_Stop):
        groups.init_parallel(ParallelLayout(8, 1, 1, 8, 1, 1), seed=0)
    assert chosen == [torch.device("cuda", 0)]


@pytest.mark.parametrize("local_rank", [None, "0", "5"])
def test_deepspeed_binds_the_rank_device_when_each_task_sees_one(monkeypatch, local_rank):
    """LOCAL_RANK 5 in a task that sees one GPU: DeepSpeed's engine binds cuda:0 inside
    `engine_device` (DeepSpeed's own device code runs; the accelerator is mocked), and LOCAL_RANK
    is what it was afterwards."""
    import_deepspeed()
    from types import SimpleNamespace

    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime import engine as ds_engine

    from hippo.parallel.deepspeed_compat import engine_device

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    chosen: list[int] = []
    accelerator = type(get_accelerator())
    monkeypatch.setattr(accelerator, "set_device", lambda self, index: chosen.append(index))
    monkeypatch.setattr(accelerator, "device_name", lambda self, index=None: "cpu")
    monkeypatch.setattr(ds_engine.dist, "get_world_size", lambda *a, **k: 8)
    monkeypatch.setattr(ds_engine.dist, "get_rank", lambda *a, **k: 5)
    engine = SimpleNamespace()
    with engine_device(torch.device("cuda", 0)):
        # What DeepSpeedEngine.__init__ does with args=None: the local rank from the environment, then the device.
        ds_engine.DeepSpeedEngine._configure_with_arguments(engine, None, None)
        ds_engine.DeepSpeedEngine._set_distributed_vars(engine, None)
    assert chosen == [0]
    import os

    assert os.environ.get("LOCAL_RANK") == local_rank
