"""Configuration of a Hippo language model (H3, S4D and attention mixers) for `transformers`.

Written by `hippo export --format hf` next to `modeling_hippo.py`; loads with torch and transformers
only. The field names are Hippo's own `model` config, so a folder goes back into Hippo unchanged
(`hippo import hf`, `hippo train --init-from`).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class HippoConfig(PretrainedConfig):
    """Sizes of the model, and which mixer each layer uses (`attn_layer_idx` are attention, the
    rest `mixer`: "h3" or "s4d"). `vocab_size` is the tokenizer's; the embedding has
    `padded_vocab_size` rows and the model returns logits over the first `vocab_size` only."""

    model_type = "hippo"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}

    def __init__(
        self,
        vocab_size: int = 257,
        pad_vocab_multiple: int = 8,
        d_model: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        mixer: str = "h3",
        attn_layer_idx: list[int] | None = None,
        d_state: int = 64,
        mlp_ratio: int = 4,
        position_embedding: str = "none",
        rotary_dim: int | None = None,
        max_position_embeddings: int = 2048,
        layer_norm_eps: float = 1e-5,
        init_std: float = 0.02,
        document_isolation: bool = False,
        eos_id: int | None = None,
        use_cache: bool = False,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.pad_vocab_multiple = pad_vocab_multiple
        self.d_model = d_model
        self.n_layer = n_layer
        self.n_head = n_head
        self.mixer = mixer
        self.attn_layer_idx = list(attn_layer_idx or [])
        self.d_state = d_state
        self.mlp_ratio = mlp_ratio
        self.position_embedding = position_embedding
        self.rotary_dim = rotary_dim
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.init_std = init_std
        # Packed documents: a token after eos_id begins a new one, which sees nothing before it.
        self.document_isolation = document_isolation
        self.eos_id = eos_id
        # Off for a plain forward (scoring needs no recurrent state); `generate` turns it on.
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def layer_mixers(self) -> list[str]:
        return ["attention" if i in self.attn_layer_idx else self.mixer for i in range(self.n_layer)]
