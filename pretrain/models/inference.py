"""State carried between calls in recurrent (generation) mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
