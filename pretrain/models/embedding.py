"""Token embedding (plus learned positions, if configured); its weight is also the tied LM head.

Under `model.document_isolation` it also reads where documents begin from the token ids it embeds
(`documents.document_starts`) and returns `(hidden, doc_start)`: the one activation the layer list
(`parallel.pipeline`) passes to the blocks, which hand `doc_start` to their mixers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hippo.pretrain.models.config import ConfigError, ModelConfig
from hippo.pretrain.models.documents import document_starts
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
        self.isolate_documents = cfg.document_isolation
        self.eos_id = cfg.eos_id

    def forward(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids -> (B, L, D) hidden states; `offset` is the first token's position.
        With document isolation, (hidden states, doc_start (B, L) bool)."""
        h = self.embed(input_ids, offset)
        return (h, self.doc_start(input_ids)) if self.isolate_documents else h

    def doc_start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where documents begin in (B, L) token ids: this rank's chunk of the whole sequence's map
        under context parallelism (the token before the chunk comes from the previous rank)."""
        if self.eos_id is None:
            raise ConfigError("model.document_isolation needs model.eos_id (the end-of-document token; "
                              "`hippo train` takes it from the data's tokenizer)")
        previous = None
        if self._sequence.split:  # a collective: every rank of the group gathers, rank 0 included
            before = self._sequence.history(input_ids.unsqueeze(1), 1)[:, 0, 0]
            previous = before if self._sequence.rank > 0 else None
        return document_starts(input_ids, self.eos_id, previous)

    def embed(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
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
