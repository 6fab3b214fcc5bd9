"""Every use Hippo makes of Megatron-core beyond its public API, in one place, and the door through
which Hippo imports Megatron's tensor-parallel layers.

megatron-core is pinned to one minor release (pyproject.toml); `tests/parallel/test_megatron_compat.py`
checks the item below against the installed version and names it if it moved. Private uses:

1. `torch.cuda.current_device` replaced by a function returning the CPU device, only inside
   `cpu_current_device()` (a training or evaluation step under sequence parallelism without a GPU),
   and restored after it. Megatron allocates its sequence-parallel communication buffers with
   `device=torch.cuda.current_device()` (`tensor_parallel.mappings`, `layers`), in the forward and
   in the backward, and takes no device argument: there is no public route to CPU buffers.

Not private, and so not counted: the `parallel_state` module-level API (megatron-core is moving to
`pg_collection`, which the layers used here do not need yet). Gone since issue 22: the overwrite of
`tensor_parallel.random._CUDA_RNG_STATE_TRACKER` (Hippo forks DeepSpeed's tracker itself) and reading
the layers' `tp_group` / `sequence_parallel` attributes (the layers' config says the same).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

# Importing megatron.core warns that Transformer Engine and Apex are missing: they would speed up
# Megatron's optimizers and FSDP, which Hippo does not use (DeepSpeed runs both), so the warning
# means nothing to a Hippo user.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel  # noqa: F401  (re-exported)

__all__ = ["ModelParallelConfig", "cpu_current_device", "parallel_state", "tensor_parallel"]


def _cpu_device() -> torch.device:
    return torch.device("cpu")


@contextlib.contextmanager
def cpu_current_device() -> Iterator[None]:
    """Inside: `torch.cuda.current_device()` names the CPU (private item 1); restored on the way out.
    Call it only where there is no GPU."""
    saved = torch.cuda.current_device
    torch.cuda.current_device = _cpu_device
    try:
        yield
    finally:
        torch.cuda.current_device = saved
