"""Packed documents: where they start, and what isolating them costs the SSM kernels.

`doc_start` (B, L) bool marks the positions whose token begins a new document (the token after an
EOS); position 0 needs no mark. With it, the output at t may depend only on the inputs in
[s(t), t], s(t) the last start <= t. For an LTI system that is exactly the output without
isolation minus the free response of the state just before s(t) over [s(t), t]:
  - shift SSM (taps of lags < N <= P): its state is the P inputs before a start p; their response
    reaches p .. p + N - 2 only (`shift_correction`);
  - diagonal SSM: the state restarts at each start. The chunked path (`kernels.h3_core`) does it
    per chunk of P with the masks of `ChunkPlan`: the incoming state's response stops at a chunk's
    first start, the carry into the next chunk comes only from after its last start, and the few
    in-chunk products that cross a start are subtracted (one P x P product per start).
Nothing here reads token ids or configs. Imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ChunkPlan",
    "after_last_start",
    "before_first_start",
    "check_doc_start",
    "document_spans",
    "shift_correction",
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


def shift_correction(k: torch.Tensor, S1: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """What the shift SSM's output must lose so that no tap crosses a start: (B, C, L), stored
    channels-last, differentiable in k and S1.

    S1 (C, P, P): S1[j, i] = taps[P + i - j], the response at p + i of the input at p - P + j
    (the chunked path's "previous chunk" band; lags < N <= P, so nothing reaches past p + P - 1).
    For each start p: the P inputs before it (zeros before 0) times S1, kept on [p, next start)
    and below L, subtracted. One (1 x P) @ (P x P) product per start.
    """
    B, C, L = k.shape
    P = S1.shape[-1]
    rows, pos = doc_start.nonzero(as_tuple=True)
    keep = pos > 0
    rows, pos = rows[keep], pos[keep]
    delta = k.new_zeros(B, L, C, dtype=S1.dtype)
    if pos.numel() == 0:
        return delta.transpose(1, 2)
    lag = torch.arange(P, device=k.device)
    src = pos.unsqueeze(-1) - P + lag  # (n, P): inputs p - P .. p - 1
    window = k.transpose(1, 2)[rows.unsqueeze(-1), src.clamp(min=0)].to(S1.dtype)  # (n, P, C)
    window = window * (src >= 0).unsqueeze(-1)
    corr = torch.bmm(window.permute(2, 0, 1), S1)  # (C, n, P): outputs p .. p + P - 1
    dst = pos.unsqueeze(-1) + lag
    count = doc_start.cumsum(-1)
    inside = (dst < L) & (count[rows.unsqueeze(-1), dst.clamp(max=L - 1)] == count[rows, pos].unsqueeze(-1))
    vals = corr.permute(1, 2, 0) * inside.unsqueeze(-1)  # (n, P, C)
    delta = delta.index_put((rows.unsqueeze(-1).expand_as(dst), dst.clamp(max=L - 1)), -vals, accumulate=True)
    return delta.transpose(1, 2)


@dataclass(frozen=True)
class _BlockPlan:
    head: torch.Tensor  # (1, rows, P): t before the chunk's first start (the incoming state reaches it)
    tail: torch.Tensor  # (1, rows, P): i at or after the chunk's last start (feeds the outgoing state)
    keep: torch.Tensor  # (1, ab, B, 1): the chunk has no start (the state carries through it)
    rows: torch.Tensor  # (n,) row of each in-chunk start at offset > 0
    inputs: torch.Tensor  # (1, n, P): i before that start
    outputs: torch.Tensor  # (1, n, P): t from that start to the chunk's next one


class ChunkPlan:
    """Per block of the chunked path (`kernels.h3_core._spans`), in its chunk-major row order
    (row a B + b = chunk a of sample b), the masks that restart the diagonal SSM at each start."""

    def __init__(self, doc_start: torch.Tensor, spans: list[tuple[int, int, int]], P: int, dtype: torch.dtype):
        B, L = doc_start.shape
        nch = -(-L // P)
        ds = F.pad(doc_start, (0, nch * P - L)).view(B, nch, P)
        count = ds.cumsum(-1)
        total = count[..., -1:]
        head = (count == 0).to(dtype)
        tail = (count == total).to(dtype)
        keep = (total == 0).to(dtype)  # (B, nch, 1)
        inner = ds.clone()
        inner[..., 0] = False
        b_idx, a_idx, o_idx = inner.nonzero(as_tuple=True)
        lag = torch.arange(P, device=ds.device)
        ins = (lag < o_idx.unsqueeze(-1)).to(dtype)
        outs = (count[b_idx, a_idx] == count[b_idx, a_idx, o_idx].unsqueeze(-1)).to(dtype)
        self.blocks = []
        for t0, _, tp in spans:
            a0, ab = t0 // P, tp // P
            sel = (a_idx >= a0) & (a_idx < a0 + ab)
            self.blocks.append(_BlockPlan(
                head=head[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab * B, P),
                tail=tail[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab * B, P),
                keep=keep[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab, B, 1),
                rows=(a_idx[sel] - a0) * B + b_idx[sel],
                inputs=ins[sel].unsqueeze(0),
                outputs=outs[sel].unsqueeze(0),
            ))
        # The last chunk, for the final state (`kernels.h3_core._h3_core_chunked`): (B, P), (B, 1).
        self.last_tail, self.last_keep = tail[:, -1], keep[:, -1]
