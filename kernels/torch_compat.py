"""Every use Hippo makes of PyTorch beyond its public API, in one place.

The package states a torch floor, not a pin, so an upgrade can move any name below; each is
checked against the installed torch by `tests/kernels/test_torch_compat.py`, which names the one
that moved. Private uses, each with why no public route exists:

1. `torch.ops.aten._fft_r2c` / `_fft_c2c` (`fft_r2c`, `fft_c2c`; `kernels.fftconv`'s backward):
   the FFT convolution's hand-written backward reproduces the gradients PyTorch's own FFT
   backwards give, bit for bit; those are defined with these two ops (torch/csrc/autograd/
   FunctionsManual.cpp), and `torch.fft.*` normalizes and pads differently.
2. `torch._C._dispatch_tls_local_exclude_set`, `_dispatch_tls_local_include_set`,
   `_ForceDispatchKeyGuard` and `DispatchKey.Conjugate` / `Negative` (`eager_view_dispatch`;
   `kernels.ops`): inside a custom op run by AOTAutograd, conjugate and negative views stay lazy
   and later ops read them unresolved; no public switch gives an op body eager's dispatch back.
3. `nn.Module._compiled_call_impl` (`undo_module_compile`; `parallel.compiled`): what
   `nn.Module.compile()` sets; there is no public "uncompile" to fall back to eager in place.
4. `torch._dynamo.config.recompile_limit` (`raise_recompile_limit`): every block runs one
   `Block.forward` code object; past the limit dynamo silently runs the rest eager. The config
   module is dynamo's documented knob but lives under a private package.
5. `torch._dynamo.utils.counters` (`dynamo_counts`): graphs captured and graph breaks, to log
   and test that a compiled block is one graph; `torch._dynamo.explain` re-traces instead.

This module imports only torch (it sits with the kernels so that every layer above may use it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

_LAZY_VIEW_KEYS = (torch._C.DispatchKey.Conjugate, torch._C.DispatchKey.Negative)


def fft_r2c(x: torch.Tensor, onesided: bool = True) -> torch.Tensor:
    """Unnormalized-by-n real-to-complex FFT over the last dim, normalized by 1/n (aten's norm
    mode 2), as PyTorch's irfft backward computes it."""
    return torch.ops.aten._fft_r2c(x, [x.dim() - 1], 2, onesided)


def fft_c2c(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized inverse complex FFT over the last dim (norm mode 0), as PyTorch's rfft
    backward computes it."""
    return torch.ops.aten._fft_c2c(x, [x.dim() - 1], 0, False)


@contextlib.contextmanager
def eager_view_dispatch() -> Iterator[None]:
    """Conjugate and negative views resolved as in eager, wherever the caller runs (a no-op in
    eager itself, where those dispatch keys are not excluded)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    if not any(exclude.has(key) for key in _LAZY_VIEW_KEYS):
        yield
        return
    for key in _LAZY_VIEW_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def undo_module_compile(module: nn.Module) -> None:
    """Back to eager calls after `module.compile()` (state-dict keys never changed)."""
    module._compiled_call_impl = None


def raise_recompile_limit(at_least: int) -> None:
    """Let dynamo keep at least this many compiled entries per code object."""
    import torch._dynamo.config as config

    config.recompile_limit = max(config.recompile_limit, at_least)


def dynamo_counts() -> tuple[int, int]:
    """(graphs captured, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
