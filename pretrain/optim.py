"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

The model never builds its optimizer: grouping reads tags the layers put on their parameters.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn

from hippo.pretrain.config import OptimConfig
from hippo.pretrain.models.ssm import is_ssm_dynamics


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three groups: SSM dynamics (no decay, lr capped), biases and norms (no decay), the rest.

    Parameter order inside each group follows `model.named_parameters()`, so every rank and
    every run builds identical groups.
    """
    no_decay_modules = (nn.LayerNorm,)
    no_decay_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, no_decay_modules)
        for p in m.parameters(recurse=False)
    }
    ssm, plain_no_decay, decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_ssm_dynamics(p):
            ssm.append(p)
        elif id(p) in no_decay_ids or name.endswith("bias"):
            plain_no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"name": "no_decay", "params": plain_no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"name": "ssm", "params": ssm, "weight_decay": 0.0, "lr": min(cfg.ssm_lr_cap, cfg.lr)},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, optimizer_cls: type[torch.optim.AdamW] = torch.optim.AdamW
) -> torch.optim.AdamW:
    groups = parameter_groups(model, cfg)
    return optimizer_cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=_fused(groups))


def _fused(groups: list[dict]) -> bool | None:
    """PyTorch's fused AdamW (one pass per tensor) where every parameter allows it (CPU or CUDA).

    The unfused update allocates temporaries the size of each tensor (sqrt of the second moment,
    its quotient): DeepSpeed's ZeRO flattens each group into one tensor, so on CPU that is two fresh
    allocations of the whole group every step (~0.5 s a step for a 125M model, against ~0.08 s
    fused; benchmarks/bench_train_overhead.py). The same update, rounded differently in the last bit.
    """
    params = [p for g in groups for p in g["params"]]
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's base lr at `step` (0-based): linear warmup, cosine to the floor."""
    warmup = max(1, math.ceil(cfg.warmup_fraction * total_steps)) if cfg.warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, cfg))


def optimizer_factory(cfg: OptimConfig, total_steps: int):
    """The engine's optimizer factory: (module, AdamW class) -> (AdamW, schedule) for this run."""

    def build(module: nn.Module, optimizer_cls: type[torch.optim.AdamW]):
        optimizer = build_optimizer(module, cfg, optimizer_cls)
        return optimizer, build_scheduler(optimizer, total_steps, cfg)

    return build

