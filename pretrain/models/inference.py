"""State carried between calls in recurrent (generation) mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class InferenceParams:
    """Per-layer recurrent state, keyed by layer index.

    The first forward with `seqlen_offset == 0` is the prefill: every mixer runs in convolution
    (or full-attention) mode and stores its state here. Later forwards take one token each; the
    caller advances `seqlen_offset` by the number of tokens consumed.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    states: dict[int, Any] = field(default_factory=dict)
    doc_reset: torch.Tensor | None = None
    """(B,) bool for the current decode step, set by `HippoLM` under `model.document_isolation`: rows
    whose previous token was EOS, so the token now fed starts a new document. Recurrent mixers zero
    those rows' states before stepping; attention masks the cache entries before it. None: no reset."""
    doc_begin: torch.Tensor | None = None
    """(B,) int64: the position where each row's current document begins, kept by the attention
    layers (every layer writes the same value); None until a boundary map or reset is seen."""
    previous_eos: torch.Tensor | None = None
    """(B,) bool: whether the last token fed to each row was EOS (`HippoLM`'s memory for `doc_reset`)."""
