"""Where packed documents begin, from the token ids (`model.document_isolation`).

A window of `seq_len + 1` tokens holds several documents, each ended by the EOS token. The
boundary map every mixer takes, `doc_start` (B, T) bool, is True at a position whose token
begins a new document: the position right after an EOS (an EOS belongs to the document it
ends). Position 0 of a window needs no flag; a window that starts mid-document treats its first
tokens as one document. Under context parallelism a rank holds one chunk of the sequence: its
map is the whole sequence's map cut to the chunk, which needs only the token just before the
chunk (`previous`).
"""

from __future__ import annotations

import torch

__all__ = ["document_starts", "document_ids", "last_document_start"]


def document_starts(input_ids: torch.Tensor, eos_id: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) token ids -> (B, T) bool, True right after each EOS.

    `previous` (B,): the token before position 0 (the last token of the previous chunk under
    context parallelism); None where position 0 starts the window.
    """
    eos = input_ids == eos_id
    first = eos.new_zeros(eos.shape[:-1] + (1,)) if previous is None else (previous == eos_id).unsqueeze(-1)
    return torch.cat((first, eos[..., :-1]), dim=-1)


def document_ids(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) int32: the index of each position's document within the window
    (0 for the tokens before the first boundary). Two positions are in the same document iff
    their ids are equal."""
    return doc_start.to(torch.int32).cumsum(-1, dtype=torch.int32)


def last_document_start(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) int64: the position where each row's last document begins (0 if none)."""
    positions = torch.arange(doc_start.shape[-1], device=doc_start.device)
    return torch.where(doc_start, positions, 0).amax(-1)
