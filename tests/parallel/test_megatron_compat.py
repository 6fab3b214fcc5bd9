"""`hippo.parallel.megatron_compat` against the installed megatron-core: its one private use is
still needed, and it leaves the process as it found it."""

from __future__ import annotations

import inspect

import torch

from hippo.parallel.megatron_compat import cpu_current_device, tensor_parallel


def test_megatron_still_allocates_sequence_parallel_buffers_on_the_current_cuda_device():
    import megatron.core

    source = inspect.getsource(tensor_parallel.mappings)
    assert "torch.cuda.current_device()" in source, (
        f"megatron-core {megatron.core.__version__} no longer allocates its sequence-parallel buffers with "
        "torch.cuda.current_device(): hippo.parallel.megatron_compat.cpu_current_device (private item 1) may be "
        "unnecessary now, or must patch what replaced it")


def test_cpu_current_device_is_scoped():
    before = torch.cuda.current_device
    with cpu_current_device():
        assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.current_device is before


def test_hippo_forks_deepspeeds_tracker_and_leaves_megatrons_alone():
    """The TP dropout stream is DeepSpeed's tracker, called directly: Megatron's module globals are
    not overwritten (the parity tests check the streams themselves)."""
    from hippo.parallel import groups
    from hippo.parallel import tensor_parallel as hippo_tp

    assert "_CUDA_RNG_STATE_TRACKER" not in inspect.getsource(groups)
    assert "checkpointing.get_cuda_rng_tracker().fork()" in inspect.getsource(hippo_tp.tensor_parallel_rng)
