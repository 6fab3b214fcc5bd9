"""The DeepSpeed engine for a Hippo run: pipeline engine when PP > 1 (or ZeRO <= 1), the plain
engine with Megatron's groups as `mpu` for ZeRO-2; clipping by the global gradient norm over
every group; a step skipped everywhere when any rank's gradient is not finite.

The engine knows the model config, the layout and an optimizer factory, nothing of the run
config: `build_train_engine` composes one from those.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from hippo.parallel.gather import load_full_parameters
from hippo.parallel.groups import ParallelState
from hippo.parallel.layout import ParallelLayout
from hippo.parallel.pipeline import SequentialLM, build_pipeline
from hippo.parallel.runtime import import_deepspeed
from hippo.parallel.tensor_parallel import mark_sequence_parallel_norms, megatron_linears, sequence_parallel_grad_hooks
from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.linear import Linears, partition_dim

OptimizerFactory = Callable[[nn.Module, type[torch.optim.AdamW]], tuple[torch.optim.Optimizer, Any]]
"""(module, optimizer class) -> (optimizer over the module's parameters, its LR scheduler)."""


def deepspeed_config(layout: ParallelLayout, *, precision: str, grad_clip: float, load_universal: bool = False) -> dict[str, Any]:
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise: always say it.
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": layout.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_module(cfg: ModelConfig, state: ParallelState, linears: Linears, *, seed: int) -> nn.Module:
    """This rank's part of the model as the layer list DeepSpeed runs, on the rank's device."""
    layout = state.layout
    loss_fn = mean_token_loss(linears)
    if layout.pipelined:
        module = build_pipeline(cfg, layout, linears, state.topology, loss_fn, seed=seed)
    else:
        module = SequentialLM(cfg, linears, loss_fn, seed=seed, activation_checkpointing=layout.activation_checkpointing)
    module.to(state.device)
    if layout.sequence_parallel:
        mark_sequence_parallel_norms(module)
        sequence_parallel_grad_hooks(module, state.tp_group)
    return module


def mean_token_loss(linears: Linears) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return linears.cross_entropy(logits, labels).mean()

    return loss


def build_train_engine(cfg: ModelConfig, state: ParallelState, optimizer_factory: OptimizerFactory, *, seed: int,
                       precision: str = "fp32", grad_clip: float = 1.0, load_universal: bool = False,
                       initial_weights: Callable[[str], torch.Tensor] | None = None) -> TrainEngine:
    """Model, optimizer and DeepSpeed engine for this rank. `load_universal`: the engine will
    load a universal checkpoint (one written under another layout). `initial_weights(name)`: the
    single-process tensor of each parameter to start from (a pretrained model) instead of the
    seeded initialization; loaded before DeepSpeed copies the weights into its optimizer."""
    deepspeed = import_deepspeed()
    layout = state.layout
    linears = megatron_linears(state.tp_rank, layout.tensor, layout.pipeline, sequence_parallel=layout.sequence_parallel)
    module = build_module(cfg, state, linears, seed=seed)
    if initial_weights is not None:
        load_full_parameters(module, state, initial_weights)
    optimizer, scheduler = optimizer_factory(module, FiniteStepAdamW)
    engine, optimizer, _, _ = deepspeed.initialize(
        # DeepSpeed would set_device(LOCAL_RANK): wrong where each task sees one GPU (SLURM).
        args=argparse.Namespace(device_rank=state.device.index or 0),
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        mpu=None if layout.pipelined else state.mpu,  # a pipeline module brings its own grid (same topology)
        config=deepspeed_config(layout, precision=precision, grad_clip=grad_clip, load_universal=load_universal),
    )
    with torch.device("meta"):  # every stage's parameter names, without allocating
        whole_model = SequentialLM(cfg, linears, None, seed=seed)
    set_universal_checkpoint_info(module, whole_model)
    return TrainEngine(engine, module, optimizer, linears, state)


class TrainEngine:
    """One optimizer step per `train_batch` call, whatever the DeepSpeed engine underneath."""

    last_step_skipped = False

    def __init__(self, engine, module: nn.Module, optimizer, linears: Linears, state: ParallelState):
        self.engine, self.module, self.optimizer, self.linears, self.state = engine, module, optimizer, linears, state
        self.pipelined = state.layout.pipelined

    def train_batch(self, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward/backward over this rank's micro-batches, then one optimizer step (skipped,
        see `last_step_skipped`, when any gradient anywhere is not finite).

        Returns the mean loss over the global batch (the same on every rank).
        """
        skipped_before = self.engine.skipped_steps
        it: Iterator = iter(micro_batches)
        if self.pipelined:
            loss = self.engine.train_batch(data_iter=_to_device(it, self.state.device)).item()
        else:
            total = torch.zeros((), device=self.state.device)
            for _ in range(self.state.layout.grad_accum_steps):
                input_ids, labels = (t.to(self.state.device) for t in next(it))
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
        it: Iterator = iter(micro_batches)
        if self.pipelined:
            return self.engine.eval_batch(data_iter=_to_device(it, self.state.device)).item()
        self.engine.eval()
        total = torch.zeros((), device=self.state.device)
        for _ in range(self.state.layout.grad_accum_steps):
            input_ids, labels = (t.to(self.state.device) for t in next(it))
            total += self.engine(input_ids, labels)
        self.engine.train()
        return self._dp_mean(total / self.state.layout.grad_accum_steps)

    def _dp_mean(self, value: torch.Tensor) -> float:
        dist.all_reduce(value, group=self.state.dp_group)
        return (value / self.state.layout.data).item()

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

    DeepSpeed's ZeRO optimizers do this check themselves before calling `step`; without ZeRO it
    reads `overflow` from its optimizer to count the step as skipped and hold the schedule. All
    ranks call `step` together, so the flag is agreed on by an all-reduce over the world.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = self._any_rank_non_finite()
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
            bad = torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().any().float()
        else:
            bad = torch.zeros((), device=device)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())


def _to_device(it: Iterator, device: torch.device) -> Iterator:
    for input_ids, labels in it:
        yield input_ids.to(device), labels.to(device)
