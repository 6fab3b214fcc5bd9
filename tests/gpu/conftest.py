"""The `gpu` tier: what a user runs, on one CUDA device (`pytest -m gpu`, `benchmarks/gpu/run.sh`).

Every test here is marked `gpu`. Without CUDA they are skipped with the reason, unless
HIPPO_GPU_DRY_RUN=1 (the CPU dry run of `benchmarks/gpu/run.sh --dry-run`), which runs the same
tests on the CPU at tiny shapes: gloo, DS_ACCELERATOR=cpu, the Triton kernels under
TRITON_INTERPRET=1. The dry run proves the tier's plumbing, not GPU numerics; the bounds asserted
are the CPU tests' own, imported from them, never copied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

DRY_RUN = os.environ.get("HIPPO_GPU_DRY_RUN") == "1"
HAS_CUDA = torch.cuda.is_available()
SKIP_REASON = "needs a CUDA device (HIPPO_GPU_DRY_RUN=1 runs the tier on the CPU at tiny shapes)"


@pytest.hookimpl(tryfirst=True)  # before `-m gpu` selects
def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not (HAS_CUDA or DRY_RUN):
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@dataclass(frozen=True)
class Target:
    """Where the tier runs and at which sizes: the GPU's, or the dry run's tiny ones."""

    device: torch.device
    dry_run: bool
    kernel_lengths: tuple[int, ...]
    """Triton FlashConv lengths (fp32 stops at 2048: the launcher's largest fp32 configuration)."""
    dtypes: tuple[str, ...]
    models: dict[str, str]
    """Shipped config of each LM the tier builds: name -> config."""
    model_overrides: dict[str, tuple[str, ...]]
    """Per LM: `--set`s that shrink the shipped 125M config in the dry run (none on the GPU)."""
    seq_len: int
    layer_len: int

    def model_config(self, name: str):
        """The shipped config of LM `name` as the trainer reads it (with the dry run's shrink)."""
        from hippo.pretrain.config import load_config

        return load_config(self.models[name], list(self.model_overrides[name])).model


@pytest.fixture(scope="session")
def target() -> Target:
    models = {"h3": "h3_125m", "hybrid": "hybrid_125m", "transformer": "transformer_125m"}
    if DRY_RUN and not HAS_CUDA:
        small = ("model.vocab_size=257", "model.d_model=32", "model.n_layer=2", "model.n_head=4")
        shrink = {name: small + (("model.attn_layer_idx=[1]",) if name == "hybrid" else ()) for name in models}
        return Target(torch.device("cpu"), True, (256,), ("fp32", "bf16"), models, shrink, seq_len=64, layer_len=300)
    return Target(torch.device("cuda"), False, (256, 512, 1024, 2048, 4096, 8192), ("fp32", "fp16", "bf16"),
                  models, {name: () for name in models}, seq_len=2048, layer_len=2048)

