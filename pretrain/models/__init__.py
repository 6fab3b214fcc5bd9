"""Hippo's models: H3, S4D and attention mixers in a pre-norm language model.

Names are resolved on first use (PEP 562), so `hippo.pretrain.models.config` (the model config,
read by the run config on launching hosts) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Block": "block",
    "CausalSelfAttention": "attention",
    "ConfigError": "config",
    "H3": "h3",
    "HippoLM": "lm",
    "InferenceParams": "inference",
    "Linears": "linear",
    "MLP": "mlp",
    "ModelConfig": "config",
    "S4D": "s4d",
    "SINGLE_PROCESS": "linear",
    "TokenEmbedding": "embedding",
    "count_parameters": "lm",
    "init_parameters": "init",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
