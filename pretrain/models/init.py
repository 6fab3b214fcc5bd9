"""The paper's initialization, identical for every parallel layout.

Each parameter is drawn from its own generator, seeded by (run seed, the parameter's name in the
single-process model), at the full tensor's size, and then cut to the shard this rank holds. A
model split over TP=2 x PP=2 therefore starts from exactly the weights of the TP=1 model with
the same seed, whichever stage builds which layer and in which order.

Rules: Linear and Embedding weights N(0, init_std), residual-branch outputs (attention out-proj,
MLP fc2) scaled by 1/sqrt(2 n_layer), biases 0, LayerNorm 1/0; SSM parameters keep their own
init (`initial_value` on the module).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn

from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.linear import partition_dim


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (run seed, parameter name), stable across Python processes."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _full_value(module: nn.Module, name: str, shape: tuple[int, ...], gen: torch.Generator, cfg: ModelConfig) -> torch.Tensor:
    if hasattr(module, "initial_value"):
        return module.initial_value(name, shape, gen)
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)
    if name == "bias":
        return torch.zeros(shape)
    if name == "weight":
        std = cfg.init_std
        if getattr(module, "residual_out", False):
            std /= math.sqrt(2 * cfg.n_layer)
        return torch.empty(shape).normal_(0.0, std, generator=gen)
    raise ValueError(f"no initialization rule for parameter {name!r} of {type(module).__name__}")


@torch.no_grad()
def init_parameters(
    module: nn.Module, cfg: ModelConfig, *, seed: int, prefix: str = "", tp_rank: int = 0, tp_size: int = 1
) -> None:
    """Initialize every parameter of `module`, whose names in the full model start with `prefix`."""
    for module_name, sub in module.named_modules():
        for name, p in sub.named_parameters(recurse=False):
            if p.is_meta:
                continue
            full_name = f"{prefix}{module_name}.{name}" if module_name else f"{prefix}{name}"
            dim = partition_dim(p)
            shape = list(p.shape)
            if dim is not None:
                shape[dim] *= tp_size
            gen = torch.Generator().manual_seed(parameter_seed(seed, full_name))
            value = _full_value(sub, name, tuple(shape), gen, cfg)
            if dim is not None:
                value = value.narrow(dim, tp_rank * p.shape[dim], p.shape[dim])
            p.copy_(value)
