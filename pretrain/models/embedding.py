"""Token embedding (plus learned positions, if configured); its weight is also the tied LM head."""

from __future__ import annotations

import torch
import torch.nn as nn

from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears


class TokenEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: Linears = SINGLE_PROCESS):
        super().__init__()
        self.max_positions = cfg.max_position_embeddings
        self.word = linears.embedding(cfg.padded_vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.d_model) if cfg.position_embedding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self._lm_logits = linears.lm_logits
        self._dropout_rng = linears.sequence_rng
        self._sequence = linears.sequence

    def forward(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) hidden states; `offset` is the first token's position."""
        h = self.word(input_ids)
        if self.position is not None:
            L = input_ids.shape[1]
            offset += self._sequence.offset(L)  # a chunk of a sequence split over ranks
            if offset + L > self.max_positions:
                raise ValueError(f"sequence of {offset + L} exceeds model.max_position_embeddings={self.max_positions}")
            h = h + self.position(torch.arange(offset, offset + L, device=input_ids.device))
        with self._dropout_rng():
            return self._sequence.dropout(h, self.drop.p, self.training)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, vocab on this rank): the tied LM head."""
        return self._lm_logits(h, self.word.weight)
