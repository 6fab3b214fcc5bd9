"""The DeepSpeed engine for a Hippo run: pipeline engine when PP > 1 (or ZeRO <= 1), the plain
engine with Megatron's groups as `mpu` for ZeRO-2; clipping by the global gradient norm over
every group; a step skipped everywhere when any rank's gradient is not finite.

The engine knows the model config, the layout and an optimizer factory, nothing of the run
config: `build_train_engine` composes one from those.

Precision bf16 is DeepSpeed's bf16 mode (bf16 weights, gradients and activations, fp32 master
weights in the optimizer), except for the parameters tagged as SSM dynamics
(`pretrain.models.ssm.mark_ssm_dynamics`): they stay fp32 tensors in the module, so the SSM
kernels run on the fp32 values the optimizer updates (see `deepspeed_compat.ssm_dynamics_kept_in_fp32`).
`deepspeed_compat.BF16_AUTOCAST` is DeepSpeed's torch_autocast mode instead (not a run-config value:
see `deepspeed_compat`'s docstring, item 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from hippo.parallel.compiled import CompileResult, compile_blocks
from hippo.parallel.context_parallel import chunk_of, sequence_split
from hippo.parallel.deepspeed_compat import (engine_device, precision_config, quiet, skip_single_replica_allreduce,
                                             ssm_dynamics_kept_in_fp32)
from hippo.parallel.gather import load_full_parameters
from hippo.parallel.groups import ParallelState
from hippo.parallel.layout import ParallelLayout
from hippo.parallel.megatron_compat import cpu_current_device
from hippo.parallel.pipeline import SequentialLM, build_pipeline
from hippo.parallel.runtime import import_deepspeed
from hippo.parallel.tensor_parallel import mark_sequence_parallel_norms, megatron_linears, sequence_parallel_grad_hooks
from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.linear import Linears, partition_dim
from hippo.pretrain.models.loss import IGNORE_INDEX, eod_masked_labels, kept_token_losses

OptimizerFactory = Callable[[nn.Module, type[torch.optim.AdamW]], tuple[torch.optim.Optimizer, Any]]
"""(module, optimizer class) -> (optimizer over the module's parameters, its LR scheduler)."""


def deepspeed_config(layout: ParallelLayout, *, precision: str, grad_clip: float, load_universal: bool = False,
                     contiguous_gradients: bool = True) -> dict[str, Any]:
    """`contiguous_gradients`: ZeRO copies every gradient into one bucket buffer during the backward
    pass (against allocator fragmentation on a GPU). On CPU there is no caching allocator to fragment,
    and the copy (fresh pages every step) cost ~10% of a 125M model's step:
    `build_train_engine` turns it off there; the reduced values are the same either way."""
    return {
        "checkpoint": {"load_universal": load_universal},
        # Per replica of the parameters: under context parallelism each CP rank counts its chunks.
        "train_batch_size": layout.global_batch_size * layout.context,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise: always say it.
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": layout.zero_stage, "contiguous_gradients": contiguous_gradients},
        "zero_allow_untested_optimizer": True,
        **precision_config(precision),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_module(cfg: ModelConfig, state: ParallelState, linears: Linears, *, seed: int,
                 loss_fn: BatchLoss | None = None) -> nn.Module:
    """This rank's part of the model as the layer list DeepSpeed runs, on the rank's device."""
    layout = state.layout
    loss_fn = loss_fn or BatchLoss(linears)
    if layout.pipelined:
        module = build_pipeline(cfg, layout, linears, state.topology, loss_fn, seed=seed)
    else:
        module = SequentialLM(cfg, linears, loss_fn, seed=seed, activation_checkpointing=layout.activation_checkpointing)
    module.to(state.device)
    if layout.sequence_parallel:
        mark_sequence_parallel_norms(module)
        sequence_parallel_grad_hooks(module, state.tp_group)
    return module


class BatchLoss:
    """The layer list's loss function: DeepSpeed calls it per micro-batch on this rank's chunk, and
    averages the results over the micro-batches and the replicas (data x context).

    Every position kept, the chunk's mean: chunks are equal, so that average is the global batch's
    mean. With positions left out (`masked`: labels holding `IGNORE_INDEX`, `train.eod_mask_loss`)
    chunks keep different numbers of positions, and a mean of means would weigh them unequally and
    depend on the layout. So each chunk's *sum* of kept losses is multiplied by `scale`, which
    `TrainEngine` sets before every batch to (micro-batches x replicas) / (kept positions of the
    global batch): DeepSpeed's average is then the mean over the global batch's kept positions,
    exactly what one process computes on the whole batch at once, in any layout.
    """

    def __init__(self, linears: Linears, *, masked: bool = False):
        self.linears, self.masked, self.scale = linears, masked, 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.masked:
            return self.linears.cross_entropy(logits, labels).mean()
        return kept_token_losses(self.linears.cross_entropy, logits, labels).sum() * self.scale


def build_train_engine(cfg: ModelConfig, state: ParallelState, optimizer_factory: OptimizerFactory, *, seed: int,
                       precision: str = "fp32", grad_clip: float = 1.0, load_universal: bool = False,
                       initial_weights: Callable[[str], torch.Tensor] | None = None,
                       eod_mask_id: int | None = None,
                       compile_seq_len: int | None = None) -> TrainEngine:
    """Model, optimizer and DeepSpeed engine for this rank. `load_universal`: the engine will
    load a universal checkpoint (one written under another layout). `initial_weights(name)`: the
    single-process tensor of each parameter to start from (a pretrained model) instead of the
    seeded initialization; loaded before DeepSpeed copies the weights into its optimizer.
    `precision`: "fp32", "bf16" or `deepspeed_compat.BF16_AUTOCAST`. `eod_mask_id`: leave out of
    the loss (training and evaluation) every position whose input is this token (`train.eod_mask_loss`).
    `compile_seq_len`: compile every block in place (`compiled.compile_blocks`), warmed up at this
    sequence length; None: eager."""
    deepspeed = import_deepspeed()
    layout = state.layout
    linears = dataclasses.replace(
        megatron_linears(state.tp_rank, layout.tensor, layout.pipeline, sequence_parallel=layout.sequence_parallel),
        sequence=sequence_split(state.cp_group, state.cp_rank, layout.context),
    )
    loss_fn = BatchLoss(linears, masked=eod_mask_id is not None)
    with quiet():
        module = build_module(cfg, state, linears, seed=seed, loss_fn=loss_fn)
    if initial_weights is not None:
        load_full_parameters(module, state, initial_weights)
    optimizer, scheduler = optimizer_factory(module, FiniteStepAdamW)
    client_optimizer = optimizer
    keep_fp32 = ssm_dynamics_kept_in_fp32(module, optimizer) if precision == "bf16" else contextlib.nullcontext()
    # DeepSpeed would bind the GPU numbered LOCAL_RANK: wrong where each task sees one GPU (SLURM).
    with keep_fp32, quiet(), engine_device(state.device):
        engine, optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            mpu=None if layout.pipelined else state.mpu,  # a pipeline module brings its own grid (same topology)
            config=deepspeed_config(layout, precision=precision, grad_clip=grad_clip, load_universal=load_universal,
                                    contiguous_gradients=state.device.type == "cuda"),
        )
    if engine.zero_optimization_stage() >= 1:
        client_optimizer.check_finite = False  # ZeRO skips a non-finite step itself, before calling it
    elif layout.pipelined and layout.replicas == 1:
        # One data-parallel rank: DeepSpeed's gradient all-reduce would flatten every gradient into
        # buckets, "reduce" them over that one rank and copy them back (~8% of a 125M model's step on
        # CPU) for the same values. Tied weights are summed over stages by their own instruction, and
        # ZeRO (>= 1) needs its reduce for its partitions, so only this case skips it.
        skip_single_replica_allreduce(engine)
    with torch.device("meta"):  # every stage's parameter names, without allocating
        whole_model = SequentialLM(cfg, linears, None, seed=seed)
    set_universal_checkpoint_info(module, whole_model)
    train_engine = TrainEngine(engine, module, optimizer, linears, state, loss_fn=loss_fn, eod_mask_id=eod_mask_id)
    if compile_seq_len is not None:
        # After DeepSpeed's set-up: the blocks hold their training dtype (bf16 mode casts them). The
        # warm-up calls run the blocks as steps do, so in the steps' device scope.
        with train_engine._device_scope():
            train_engine.compiled = compile_blocks(
                module, micro_batch_size=layout.micro_batch_size, chunk_length=hidden_length(layout, compile_seq_len),
                documents=cfg.document_isolation, recompute_without_grad=layout.activation_checkpointing,
                sequence_first=layout.sequence_parallel, announce=state.rank == 0)
    return train_engine


def hidden_length(layout: ParallelLayout, seq_len: int) -> int:
    """Positions of the hidden states a block of this rank sees: its context-parallel chunk, split
    again over the TP group under sequence parallelism."""
    return seq_len // layout.context // (layout.tensor if layout.sequence_parallel else 1)


class TrainEngine:
    """One optimizer step per `train_batch` call, whatever the DeepSpeed engine underneath."""

    last_step_skipped = False
    compiled: CompileResult | None = None
    """What `train.compile` did on this rank (None: not asked)."""

    def __init__(self, engine, module: nn.Module, optimizer, linears: Linears, state: ParallelState, *,
                 loss_fn: BatchLoss | None = None, eod_mask_id: int | None = None):
        self.engine, self.module, self.optimizer, self.linears, self.state = engine, module, optimizer, linears, state
        self.loss_fn, self.eod_mask_id = loss_fn, eod_mask_id
        self.pipelined = state.layout.pipelined
        # Megatron's sequence-parallel buffers go to torch.cuda.current_device(): the CPU, during steps.
        self._device_scope = (cpu_current_device if state.layout.sequence_parallel and state.device.type == "cpu"
                              else contextlib.nullcontext)

    def train_batch(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward/backward over this rank's micro-batches, then one optimizer step (skipped,
        see `last_step_skipped`, when any gradient anywhere is not finite).

        Returns the mean loss over the global batch (the same on every rank).
        """
        with self._device_scope():
            return self._train_batch(micro_batches)

    def _train_batch(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        skipped_before = self.engine.skipped_steps
        batches = self._this_rank(micro_batches)
        if self.pipelined:
            loss = self.engine.train_batch(data_iter=batches).item()
        else:
            total = torch.zeros((), device=self.state.device)
            for _ in range(self.state.layout.grad_accum_steps):
                input_ids, labels = next(batches)
                micro_loss = self.engine(input_ids, labels)
                self.engine.backward(micro_loss)
                self.engine.step()
                total += micro_loss.detach()
            loss = self._dp_mean(total / self.state.layout.grad_accum_steps)
        self.last_step_skipped = self.engine.skipped_steps > skipped_before
        return loss

    @torch.no_grad()
    def eval_batch(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean loss over one global batch, no update (the same on every rank)."""
        with self._device_scope():
            return self._eval_batch(micro_batches)

    def _eval_batch(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        batches = self._this_rank(micro_batches)
        if self.pipelined:
            return self.engine.eval_batch(data_iter=batches).item()
        self.engine.eval()
        total = torch.zeros((), device=self.state.device)
        for _ in range(self.state.layout.grad_accum_steps):
            input_ids, labels = next(batches)
            total += self.engine(input_ids, labels)
        self.engine.train()
        return self._dp_mean(total / self.state.layout.grad_accum_steps)

    def _dp_mean(self, value: torch.Tensor) -> float:
        dist.all_reduce(value, group=self.state.replica_group)
        return (value / self.state.layout.replicas).item()

    def _this_rank(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator:
        """(input_ids, labels) on the device, cut to this rank's chunk of each sequence. Under
        `eod_mask_id` the labels are masked and the loss scaled for the global batch first, before
        the engine runs (the count is a collective: not inside DeepSpeed's pipeline schedule)."""
        if self.eod_mask_id is not None:
            micro_batches = [(x, eod_masked_labels(x, y, self.eod_mask_id)) for x, y in micro_batches]
            self._scale_for_kept_positions(micro_batches)
        return self._chunks(iter(micro_batches))

    def _chunks(self, micro_batches: Iterator) -> Iterator:
        cp, size = self.state.cp_rank, self.state.layout.context
        for input_ids, labels in micro_batches:
            yield (to_device(chunk_of(input_ids, cp, size), self.state.device),
                   to_device(chunk_of(labels, cp, size), self.state.device))

    def _scale_for_kept_positions(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`BatchLoss.scale` for this global batch: (micro-batches x replicas) / its kept positions,
        counted on the whole sequences (every context rank holds them) and summed over the replicas."""
        layout = self.state.layout
        kept = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in micro_batches)
        total = torch.tensor(kept, dtype=torch.int64, device=self.state.device)
        dist.all_reduce(total, group=self.state.replica_group)
        kept_global = total.item() // layout.context  # each context rank counted the same sequences
        self.loss_fn.scale = layout.grad_accum_steps * layout.replicas / max(kept_global, 1)

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last step, before clipping (None where DeepSpeed keeps none)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def lr(self) -> float:
        """Learning rate of the main parameter group after the last step."""
        return self.optimizer.param_groups[0]["lr"]


def set_universal_checkpoint_info(module: torch.nn.Module, whole_model: torch.nn.Module) -> None:
    """Tell DeepSpeed's universal-checkpoint converter how each parameter is split over TP ranks.

    Without it the converter refuses (or, forced, concatenates replicated tensors and cuts
    row-parallel weights along the wrong dim, silently). Patterns come from the parameters' own
    partition tags, so they cannot drift from the layers; they name the parameters of every
    pipeline stage (`whole_model`, same names), since the converter reads one stage's copy.
    """
    from deepspeed.checkpoint import constants as C

    replicated, row = [], []
    for name, p in whole_model.named_parameters():
        dim = partition_dim(p)
        if dim is None:
            replicated.append(f"^{re.escape(name)}$")
        elif dim == 1:
            row.append(f"^{re.escape(name)}$")
    setattr(module, C.UNIVERSAL_CHECKPOINT_INFO, {
        C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        C.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row,
    })


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that skips a step when any rank holds a non-finite gradient.

    DeepSpeed's ZeRO optimizers do this check themselves before calling `step` (the global
    gradient norm, and bf16's overflow check), so under ZeRO `build_train_engine` turns this one
    off (`check_finite`): it would only ever see finite gradients, at a cost of one pass over the
    flat partitions and one all-reduce per parameter group and step. Without ZeRO DeepSpeed reads
    `overflow` from its optimizer to count the step as skipped and hold the schedule. All ranks
    call `step` together, so the flag is agreed on by an all-reduce over the world.
    """

    overflow = False
    check_finite = True

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = self.check_finite and self._any_rank_non_finite()
        if self.overflow:
            return None
        return super().step(closure)

    def _any_rank_non_finite(self) -> bool:
        """One device->host sync per step: per-tensor flags stay on the device, one all-reduce
        agrees on them, one `.item()` reads the result (a `bool()` per tensor would stall the
        GPU once per parameter)."""
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")
        if grads:
            # max and min propagate NaN and reach +-inf: two reductions, no tensor of flags as
            # large as the gradient (on CPU that allocation alone costs more than both passes).
            ends = [e for g in grads if g.numel() for e in (g.amax(), g.amin())]
            bad = torch.isfinite(torch.stack(ends)).logical_not().any().float() if ends else torch.zeros(
                (), device=device)
        else:
            bad = torch.zeros((), device=device)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on the training device. On CUDA through pinned memory, asynchronously: the
    copy overlaps the previous micro-batch's kernels instead of stalling the host (the caching
    host allocator keeps the pinned block until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
