"""The language model's own configuration: sizes and which mixer each layer uses.

It knows nothing of data, optimizer, parallel layout or trainer, so a model can be built from it
alone (`HippoLM(ModelConfig(...))`); the run config (`hippo.pretrain.config`) embeds it as its
`model` section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ConfigError", "MixerKind", "ModelConfig", "RUNTIME_FIELDS", "refuse_document_isolation"]

MixerKind = Literal["h3", "s4d", "attention"]

RUNTIME_FIELDS = ("dropout", "conv_impl")
"""Fields that say how the model runs, not what its weights mean: they may differ between a
checkpoint or export and the model that loads it."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


@dataclass(kw_only=True)
class ModelConfig:
    """The language model: sizes, and which mixer each layer uses."""

    vocab_size: int = 50257
    """Tokenizer vocabulary; the embedding is padded up to a multiple of `pad_vocab_multiple`."""
    pad_vocab_multiple: int = 8
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    """Attention heads (attention layers only)."""
    mixer: MixerKind = "h3"
    """Mixer of every layer not listed in `attn_layer_idx`."""
    attn_layer_idx: list[int] = field(default_factory=list)
    """Layers that use causal attention instead of `mixer` (the hybrid models)."""
    d_state: int = 64
    """SSM state size N: shift-SSM taps, and 2x the diagonal SSM's complex modes."""
    conv_impl: Literal["auto", "triton", "chunked", "reference"] = "auto"
    """H3 convolution path: auto (Triton FlashConv on CUDA sm >= 8.0 where it has a configuration,
    else chunked), triton (raises where it cannot run), chunked (state passing, any device),
    reference (full-length FFT oracle)."""
    mlp_ratio: int = 4
    position_embedding: Literal["none", "learned", "rotary"] = "none"
    """H3 and hybrid models use none; Transformers learned or rotary."""
    rotary_dim: int | None = None
    """Rotary only: how many leading dims of each head rotate (None: all). The released H3-2.7B
    rotary model rotates 64 of its 128; the rest pass through unchanged."""
    max_position_embeddings: int = 2048
    """Only for learned positions: the longest sequence the model accepts."""
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    """Dropout on embeddings and on each residual branch."""
    init_std: float = 0.02
    document_isolation: bool = False
    """Packed documents do not see each other: the output at a position depends only on the tokens of
    its own document (from the token after the previous `eos_id` up to it; an EOS ends its document).
    Off, every layer reads across the separators, as the paper trained."""
    eos_id: int | None = None
    """The token that ends a document, for `document_isolation`; `hippo train` takes it from the
    data's tokenizer when unset, so checkpoints and exports record it."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "pad_vocab_multiple", "d_model", "n_layer", "n_head", "d_state", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_state % 2:
            raise ConfigError(f"model.d_state must be even (N/2 complex modes), got {self.d_state}")
        bad = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
        if bad:
            raise ConfigError(f"model.attn_layer_idx {bad} outside [0, n_layer={self.n_layer})")
        if len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
            raise ConfigError(f"model.attn_layer_idx has duplicates: {self.attn_layer_idx}")
        if self.uses_attention and self.d_model % self.n_head:
            raise ConfigError(f"model.n_head={self.n_head} must divide model.d_model={self.d_model}")
        self._check_rotary()
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ConfigError(f"model.eos_id={self.eos_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.conv_impl not in ("auto", "triton", "chunked", "reference"):
            raise ConfigError(f"model.conv_impl must be one of auto, triton, chunked, reference; got {self.conv_impl!r}")

    def _check_rotary(self) -> None:
        head_dim = self.d_model // self.n_head
        if self.rotary_dim is not None:
            if self.position_embedding != "rotary":
                raise ConfigError(f"model.rotary_dim={self.rotary_dim} needs model.position_embedding=rotary "
                                  f"(it is {self.position_embedding!r}); remove rotary_dim or set rotary")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                raise ConfigError(f"model.rotary_dim must be even and >= 2, got {self.rotary_dim}")
            if self.uses_attention and self.rotary_dim > head_dim:
                raise ConfigError(f"model.rotary_dim={self.rotary_dim} exceeds the head dimension "
                                  f"d_model / n_head = {head_dim}")
        elif self.position_embedding == "rotary" and head_dim % 2:
            raise ConfigError("model.position_embedding=rotary needs an even head dimension "
                              "(or an even model.rotary_dim)")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return math.ceil(self.vocab_size / m) * m

    @property
    def layer_mixers(self) -> list[MixerKind]:
        attn = set(self.attn_layer_idx)
        return ["attention" if i in attn else self.mixer for i in range(self.n_layer)]

    @property
    def uses_attention(self) -> bool:
        return "attention" in self.layer_mixers


def refuse_document_isolation(cfg: ModelConfig, target: str) -> None:
    """Refuse to write `cfg` in a format whose model does not isolate packed documents (it would
    compute other logits than the trained model without saying so)."""
    if cfg.document_isolation:
        raise ConfigError(f"model.document_isolation=true: {target} does not isolate documents yet, so it would "
                          "not compute this model's logits; use `hippo export --format hippo`")
