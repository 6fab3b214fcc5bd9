"""Packed documents: where they start, and what isolating them costs the SSM kernels.

`doc_start` (B, L) bool marks the positions whose token begins a new document (the token after an
EOS); position 0 needs no mark. With it, the output at t may depend only on the inputs in
[s(t), t], s(t) the last start <= t. For an LTI system that is exactly the output without
isolation minus the free response of the state just before s(t) over [s(t), t]. The chunked
path (`kernels.h3_core`) subtracts exactly that, from the indices of `ChunkPlan`:
  - shift SSM (taps of lags < N <= P): the previous chunk's band (S1) reads only its inputs from
    its last start on and writes only the outputs before this chunk's first start (masks); the
    in-chunk band (S0) products that cross a start are subtracted (one P/2 x P product per start);
  - diagonal SSM: the state restarts at each start: the incoming state's response stops at a
    chunk's first start, the carry into the next chunk comes only from after its last start, and
    the in-chunk Toeplitz products that cross a start are subtracted (one P/2 x P product per start).
Nothing here reads token ids or configs. Imports only torch.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ChunkPlan",
    "after_last_start",
    "before_first_start",
    "check_doc_start",
    "document_spans",
    "shared_plan",
]


def check_doc_start(doc_start: torch.Tensor, batch: int, length: int) -> None:
    """One line naming the argument when the map does not fit the activations."""
    if doc_start.dtype != torch.bool or tuple(doc_start.shape) != (batch, length):
        raise ValueError(
            f"doc_start must be a ({batch}, {length}) bool tensor, got {tuple(doc_start.shape)} {doc_start.dtype}"
        )


def after_last_start(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: t is in the row's last document (all True where the row has no start).
    What a prefill's final state and a chunk's outgoing state may depend on."""
    count = doc_start.cumsum(-1)
    return count == count[..., -1:]


def before_first_start(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: t is before the row's first start, so state from before the window reaches it."""
    return doc_start.cumsum(-1) == 0


def document_spans(starts_row: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...] of one row's documents, covering [0, L) (a start at 0 adds nothing)."""
    L = starts_row.shape[-1]
    cuts = [0] + [p for p in starts_row.nonzero().flatten().tolist() if p > 0] + [L]
    return list(zip(cuts[:-1], cuts[1:]))


@dataclass(frozen=True)
class _BlockPlan:
    """One block's share of a `ChunkPlan`. Rows index the block's (C, ab B, P) chunk-major matrices."""

    keep: torch.Tensor  # (1, ab, B, 1): the chunk has no start (the state carries through it)
    head: torch.Tensor  # (1, ab B, P): t before the row's first start (the incoming state reaches it)
    tail: torch.Tensor  # (1, ab B, P): i at or after the row's last start (feeds the outgoing state)
    prev_tail: torch.Tensor  # (1, ab B, P): `tail` of the chunk before each row's (the halo's for the first)
    pair_rows: torch.Tensor  # (n,) row of each start at an offset > 0, those at offsets <= P/2 first
    pair_in: torch.Tensor  # (1, n, P): i before that start
    pair_out: torch.Tensor  # (1, n, P): t from that start to the row's next one
    n_early: int  # starts at offsets <= P/2: their inputs lie in the chunk's first half (the
    # others' outputs in its second), so each correction needs half of the P x P matrix
    halves: bool  # corrections as half products (dense starts), else riding as extra rows


HALVES_MIN_STARTS_PER_ROW = 0.5
"""Blocks with at least this many in-chunk starts per chunk row correct them with half products
(`kernels.h3_core._cross_starts`); sparser ones let them ride in the block's product. Measured at
C 128, P 64 on one CPU thread: a separate product costs ~0.25 ms whatever its few rows (per-matrix
overhead), riding ~0.04 ms per pair row."""


class ChunkPlan:
    """Per block of the chunked path (`kernels.h3_core._spans`), in its chunk-major row order
    (row a B + b = chunk a of sample b), where the starts are and what each one corrects. Both
    SSMs multiply a chunk's inputs by a (P x P) matrix of this chunk (S0, the Toeplitz product)
    and carry the previous chunk's (S1, the state):

    - across chunks, masks: the previous chunk's inputs (S1) or state count only from its last
      start on (`prev_tail`, `tail`, `keep` stops the carry) and reach only this chunk's outputs
      before its first start (`head`): separable, no product of their own at any density;
    - inside a chunk, per start at an offset > 0 (`pair_*`): the in-chunk products that cross it
      (inputs before it, outputs from it to the row's next start) are subtracted: one product
      with half of the P x P matrix per such start (`n_early`), the same rows for both SSMs.
    """

    def __init__(self, doc_start: torch.Tensor, spans: list[tuple[int, int, int]], P: int, dtype: torch.dtype):
        B, L = doc_start.shape
        dev = doc_start.device
        nch = -(-L // P)
        ds = F.pad(doc_start, (0, nch * P - L)).view(B, nch, P)
        count = ds.cumsum(-1)
        total = count[..., -1:]
        head = (count == 0).to(dtype)
        tail = (count == total).to(dtype)
        keep = (total == 0).to(dtype)  # (B, nch, 1)
        # The chunk before chunk 0 is the zero halo: any mask will do.
        prev_tail = torch.cat((torch.ones_like(tail[:, :1]), tail[:, :-1]), dim=1)
        inner = ds.clone()
        inner[..., 0] = False
        b_idx, a_idx, o_idx = inner.nonzero(as_tuple=True)
        lag = torch.arange(P, device=dev)
        pair_in = (lag < o_idx.unsqueeze(-1)).to(dtype)
        pair_out = (count[b_idx, a_idx] == count[b_idx, a_idx, o_idx].unsqueeze(-1)).to(dtype)

        def rows(m: torch.Tensor, a0: int, ab: int) -> torch.Tensor:  # (B, nch, P) -> (1, ab B, P)
            return m[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab * B, -1)

        self.blocks = []
        early = o_idx <= P // 2
        for t0, _, tp in spans:
            a0, ab = t0 // P, tp // P
            sel = (a_idx >= a0) & (a_idx < a0 + ab)
            order = torch.cat(((sel & early).nonzero().flatten(), (sel & ~early).nonzero().flatten()))
            self.blocks.append(_BlockPlan(
                keep=keep[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab, B, 1),
                head=rows(head, a0, ab),
                tail=rows(tail, a0, ab),
                prev_tail=rows(prev_tail, a0, ab),
                pair_rows=(a_idx[order] - a0) * B + b_idx[order],
                pair_in=pair_in[order].unsqueeze(0),
                pair_out=pair_out[order].unsqueeze(0),
                n_early=int((sel & early).sum()),
                halves=int(sel.sum()) >= HALVES_MIN_STARTS_PER_ROW * ab * B,
            ))
        # The last chunk, for the final state (`kernels.h3_core._h3_core_chunked`): (B, P), (B, 1).
        self.last_tail, self.last_keep = tail[:, -1], keep[:, -1]


_last_plan: tuple | None = None  # (weak reference to the map, its key, its plan)


def shared_plan(doc_start: torch.Tensor, spans: list[tuple[int, int, int]], P: int,
                dtype: torch.dtype) -> ChunkPlan | None:
    """The `ChunkPlan` of `doc_start` (None where it has no start), kept until a call with another
    map: the SSM layers of one forward take the model's one map (`HippoLM`) and the same blocks,
    so it is built once per forward, not once per layer (a build is ~40 small ops and two reads
    back to the host). Keyed on the tensor itself (a weak reference, so nothing is kept alive),
    its version (a map changed in place is a new map), the blocks, P and the dtype; a tensor
    that keeps no version (made under inference mode) is never kept."""
    global _last_plan
    try:
        key = (doc_start._version, tuple(spans), P, dtype)
    except RuntimeError:  # inference tensors track no version
        return ChunkPlan(doc_start, spans, P, dtype) if bool(doc_start.any()) else None
    last = _last_plan
    if last is not None and last[0]() is doc_start and last[1] == key:
        return last[2]
    plan = ChunkPlan(doc_start, spans, P, dtype) if bool(doc_start.any()) else None
    _last_plan = (weakref.ref(doc_start), key, plan)
    return plan
