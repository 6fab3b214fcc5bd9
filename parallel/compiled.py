"""`train.compile`: this rank's blocks compiled in place, once, where the engine is built.

Each `Block` is compiled with `nn.Module.compile()`, which leaves the module (and so its
parameter names, state-dict keys and checkpoints) as it was: only its `__call__` goes through
dynamo. That works in every layout the same way, since each layout's model (`SequentialLM`, or a
pipeline stage's layer list) holds the blocks as submodules, TP and CP layers included.

`module.compile()` is lazy: dynamo and inductor run at a block's first call. `compile_blocks`
makes that call itself (a forward and backward on random inputs of the training shape, then an
evaluation forward), so the compile time is measured and logged once, before the first step,
and a compilation that fails falls back to eager here, with one warning naming why, instead of
inside a training step. The warm-up leaves no trace in the run: gradients are taken with respect
to the inputs only (parameter gradients and DeepSpeed's gradient hooks are never reached), and
the RNG streams it could draw from (dropout) are restored.

Inductor's caches (FX graph cache, autotuning) stay as torch configures them: on, in
`TORCHINDUCTOR_CACHE_DIR` (default: a folder under the system's temp dir), so a second run of the
same config reuses the first one's kernels.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from hippo.kernels.torch_compat import dynamo_counts, raise_recompile_limit, undo_module_compile
from hippo.pretrain.models.block import Block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileResult:
    blocks: int
    """Blocks compiled (0: none on this rank, or the compilation failed)."""
    seconds: float
    """Wall time of compiling them (the warm-up calls)."""
    graphs: int
    """Graphs dynamo captured during the warm-up."""
    graph_breaks: int
    """Graph breaks dynamo reported during the warm-up (0 for every mixer on one process)."""
    error: str | None = None
    """Why the compilation failed (the blocks then run eager)."""


def compile_blocks(module: nn.Module, *, micro_batch_size: int, chunk_length: int, documents: bool,
                   recompute_without_grad: bool = False, sequence_first: bool = False,
                   announce: bool = True) -> CompileResult:
    """Compile every `Block` of `module` in place and warm each one up at the training shape
    (micro_batch_size, chunk_length, d_model): a forward and backward in training mode and a
    forward under no_grad in eval mode (validation); with `recompute_without_grad` (activation
    checkpointing: its first forward runs without grad) also a no_grad forward in training mode.
    `documents`: the blocks take and return the layer list's (hidden, doc_start).
    `sequence_first`: the hidden states are stored sequence-first (sequence parallelism's layers
    transpose around Megatron's collectives), which dynamo guards on like a shape.
    `announce`: log the compile time (one rank does; a failure is logged by every rank it happens on)."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    if not blocks:
        return CompileResult(0, 0.0, 0, 0)
    start = time.perf_counter()
    try:
        for block in blocks:
            block.compile()
        _allow_an_entry_per_block_and_call(len(blocks))
        graphs_before, breaks_before = dynamo_counts()
        with _rng_restored(blocks[0].norm1.weight.device):
            for block in blocks:
                _warm_up(block, micro_batch_size, chunk_length, documents, recompute_without_grad, sequence_first)
    except Exception as e:  # noqa: BLE001 - any failure of dynamo/inductor: train eager instead
        for block in blocks:
            undo_module_compile(block)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.warning("train.compile: compiling the blocks failed (%s); training eager", why)  # on any rank
        return CompileResult(0, time.perf_counter() - start, 0, 0, error=why)
    graphs, breaks = dynamo_counts()
    result = CompileResult(len(blocks), time.perf_counter() - start, graphs - graphs_before, breaks - breaks_before)
    if announce:
        log.info("compiled %d blocks in %.1f s (%d graphs, %d graph breaks)", result.blocks, result.seconds,
                 result.graphs, result.graph_breaks)
    return result


def _allow_an_entry_per_block_and_call(blocks: int) -> None:
    """Every block runs the one `Block.forward` code object, and dynamo keeps at most
    `recompile_limit` (8) compiled entries per code object before it silently runs the rest eager.
    Blocks of one mixer share an entry per call kind, but guards on a block's own constants (the
    last block returns no tuple) may split them: room for three call kinds of every block."""
    raise_recompile_limit(3 * blocks)


def _warm_up(block: Block, batch: int, length: int, documents: bool, recompute_without_grad: bool,
             sequence_first: bool = False) -> None:
    """The calls a training run makes, so that each compiles now (dynamo guards on grad mode,
    training mode, dtypes, shapes and strides: each combination is one compilation)."""
    weight = block.norm1.weight
    shape = (length, batch, weight.shape[-1]) if sequence_first else (batch, length, weight.shape[-1])
    x = torch.randn(*shape, device=weight.device, dtype=weight.dtype)
    x = (x.transpose(0, 1) if sequence_first else x).requires_grad_()

    def call(h: torch.Tensor) -> torch.Tensor:
        if not documents:
            return block(h)
        doc_start = torch.zeros(batch, length, dtype=torch.bool, device=h.device)
        out = block((h, doc_start))
        return out if isinstance(out, torch.Tensor) else out[0]

    torch.autograd.grad(call(x).sum(), x)  # the input only: no parameter's .grad (or hook) is touched
    with torch.no_grad():
        if recompute_without_grad:
            call(x)
        block.eval()
        try:
            call(x)
        finally:
            block.train()


@contextlib.contextmanager
def _rng_restored(device: torch.device) -> Iterator[None]:
    """Dropout in the warm-up draws from the default generators and (tensor/sequence parallel)
    DeepSpeed's RNG tracker: all are put back, so a compiled run draws what an eager one does."""
    tracker = _rng_tracker()
    saved = tracker.get_states() if tracker is not None else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            if tracker is not None:
                tracker.set_states(saved)


def _rng_tracker():
    """DeepSpeed's tracker where DeepSpeed is loaded (every engine); else nothing can use it."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

    return get_cuda_rng_tracker()
