"""Which device `hippo eval` and `hippo generate` run a model on (`--device`)."""

from __future__ import annotations

import torch

from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.config import ConfigError


def resolve_device(device: str | None, model: HippoLM | None) -> torch.device:
    """None: the given model's own device, else CUDA when there is one. A CUDA device that is
    not there is refused by name (lm-eval's command line asks for cuda:0 unless told)."""
    if device is None:
        if model is not None:
            return next(model.parameters()).device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    return dev
