"""Packing documents into fixed windows of seq_len + 1 tokens, with exact bookkeeping.

Documents (EOS already appended) are concatenated and cut into non-overlapping windows. Counts
(documents, tokens per source file and per Pile subset, skipped records) are taken when tokens
leave the packer, not when they enter, so a snapshot taken at a shard boundary describes exactly
the shards written so far; that is what lets an interrupted prepare resume at that boundary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .manifest import SplitInfo

__all__ = ["Position", "Packer", "MAX_SKIP_EXAMPLES"]

MAX_SKIP_EXAMPLES = 20

Position = tuple[int, int, int]
"""(input file index, line, token offset within that line's document): where the next token comes from."""


@dataclass(slots=True)
class _Piece:
    file_index: int
    line: int
    tokens: np.ndarray | None  # None for a skipped record (it only carries a count)
    offset: int  # tokens of this document already consumed (resumed documents start > 0)
    source: str
    set_name: str
    skip: dict | None = None


@dataclass
class Packer:
    """Cuts one split's token stream into windows; `stats` covers exactly the windows emitted."""

    window: int
    eos_id: int
    dtype: np.dtype
    stats: SplitInfo = field(default_factory=SplitInfo)
    _pieces: deque = field(default_factory=deque)
    _buffered: int = 0
    _last: tuple[int, int] = (0, 0)

    def add_document(self, file_index: int, line: int, tokens: np.ndarray, *, offset: int,
                     source: str, set_name: str) -> None:
        """Queue a document's tokens (EOS included) from `offset` on."""
        self._pieces.append(_Piece(file_index, line, tokens, offset, source, set_name))
        self._buffered += len(tokens) - offset
        self._last = (file_index, line)

    def add_skip(self, file_index: int, line: int, example: dict) -> None:
        """Queue a skipped record so that it is counted in order with the documents around it."""
        self._pieces.append(_Piece(file_index, line, None, 0, "", "", skip=example))
        self._last = (file_index, line)

    def position(self) -> Position:
        """Where the next window's first token comes from (resume point after the last window)."""
        self._drain_skips()
        if self._pieces:
            p = self._pieces[0]
            return (p.file_index, p.line, p.offset)
        return (self._last[0], self._last[1] + 1, 0)

    def _drain_skips(self) -> None:
        while self._pieces and self._pieces[0].tokens is None:
            ex = self._pieces.popleft().skip
            reason = ex["reason"]
            self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
            if len(self.stats.skipped_examples) < MAX_SKIP_EXAMPLES:
                self.stats.skipped_examples.append(ex)

    def _take(self, n: int) -> np.ndarray:
        """Remove the next n tokens (n <= buffered), crediting them to their sources."""
        parts = []
        st = self.stats
        while n:
            self._drain_skips()
            p = self._pieces[0]
            if p.offset == 0:
                st.documents += 1
                st.sources.setdefault(p.source, {"documents": 0, "tokens": 0})["documents"] += 1
                st.set_names.setdefault(p.set_name, {"documents": 0, "tokens": 0})["documents"] += 1
            k = min(n, len(p.tokens) - p.offset)
            parts.append(p.tokens[p.offset:p.offset + k])
            p.offset += k
            n -= k
            st.tokens += k
            st.sources[p.source]["tokens"] += k
            st.set_names[p.set_name]["tokens"] += k
            if p.offset == len(p.tokens):
                self._pieces.popleft()
        self._drain_skips()
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.astype(self.dtype, copy=False)

    def windows(self) -> Iterator[np.ndarray]:
        """Every full window available now (the caller may stop early; nothing is lost)."""
        while self._buffered >= self.window:
            self._buffered -= self.window
            w = self._take(self.window)
            self.stats.samples += 1
            yield w

    def final_window(self) -> np.ndarray | None:
        """The remaining tokens padded with EOS to a full window (end of input), or None."""
        self._drain_skips()
        if not self._buffered:
            return None
        rest = self._take(self._buffered)
        pad = self.window - len(rest)
        self._buffered = 0
        self.stats.pad_tokens += pad
        self.stats.samples += 1
        return np.concatenate([rest, np.full(pad, self.eos_id, dtype=self.dtype)])
