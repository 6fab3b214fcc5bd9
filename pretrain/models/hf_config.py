"""The `config.json` of a Hugging Face folder (`hippo export --format hf`) and Hippo's own model config.

An HF folder holds Hippo's weights under Hippo's names, so Hippo reads it as an export once its
config is translated: the model fields sit at the top level (where `transformers` wants them) and
what Hippo keeps besides (step, tokenizer, runtime fields) under "hippo". Pure: no transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hippo.pretrain.models.config import RUNTIME_FIELDS, ConfigError, ModelConfig

HF_MODEL_TYPE = "hippo"
HF_ARCHITECTURE = "HippoForCausalLM"
HF_CODE = ("configuration_hippo.py", "modeling_hippo.py")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in RUNTIME_FIELDS)
"""What the weights mean: the fields written at the top level of the HF config.json."""
ADDED_FIELDS = ("document_isolation", "eos_id")
"""Model fields newer than the first HF folders: one without them has their defaults."""

__all__ = ["HF_MODEL_TYPE", "HF_ARCHITECTURE", "HF_CODE", "MODEL_FIELDS", "is_hf_config", "to_hf_config",
           "from_hf_config"]


def is_hf_config(meta: dict[str, Any]) -> bool:
    """A `transformers` config.json (it names a model_type), not a Hippo export's."""
    return "model_type" in meta and "model" not in meta


def to_hf_config(cfg: ModelConfig, *, eos_id: int, hippo: dict[str, Any]) -> dict[str, Any]:
    """config.json of the HF folder; `hippo`: step and tokenizer entries of the Hippo export."""
    runtime = {k: getattr(cfg, k) for k in RUNTIME_FIELDS}
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_hippo.HippoConfig",
                     "AutoModelForCausalLM": "modeling_hippo.HippoForCausalLM"},
        **{k: getattr(cfg, k) for k in MODEL_FIELDS},
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "tie_word_embeddings": True,
        "use_cache": False,
        "dtype": "float32",
        "hippo": {**hippo, "runtime": runtime},
    }


def from_hf_config(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """The Hippo export metadata ({"model": ..., "step", "tokenizer", ...}) of an HF config.json;
    refuses, with the reason, one Hippo cannot build exactly."""
    if meta.get("model_type") != HF_MODEL_TYPE:
        raise ConfigError(f"{where}: model_type {meta.get('model_type')!r} is not a Hippo model "
                          f"(model_type {HF_MODEL_TYPE!r}, written by `hippo export --format hf`)")
    if meta.get("tie_word_embeddings", True) is not True:
        raise ConfigError(f"{where}: tie_word_embeddings is false, but Hippo ties the LM head to the embedding")
    missing = [k for k in MODEL_FIELDS if k not in meta and k not in ADDED_FIELDS]
    if missing:
        raise ConfigError(f"{where}: lacks the model fields {missing}")
    choices = {"mixer": ("h3", "s4d", "attention"), "position_embedding": ("none", "learned", "rotary")}
    for field, allowed in choices.items():
        if meta[field] not in allowed:
            raise ConfigError(f"{where}: Hippo cannot build this model: model.{field}={meta[field]!r} is none of "
                              f"{list(allowed)}")
    hippo = meta.get("hippo") or {}
    runtime = {k: v for k, v in (hippo.get("runtime") or {}).items() if k in RUNTIME_FIELDS}
    try:
        cfg = ModelConfig(**{k: meta[k] for k in MODEL_FIELDS if k in meta}, **runtime)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: Hippo cannot build this model: {e}") from None
    extra = {k: v for k, v in hippo.items() if k != "runtime"}
    extra.setdefault("step", 0)
    extra.setdefault("tokenizer", "tokenizer.json")
    return {"model": dataclasses.asdict(cfg), **extra}
