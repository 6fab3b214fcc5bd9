"""Packed documents: where they start, and what isolating them costs the SSM kernels.

`doc_start` (B, L) bool marks the positions whose token begins a new document (the token after an
EOS); position 0 needs no mark. With it, the output at t may depend only on the inputs in
[s(t), t], s(t) the last start <= t. For an LTI system that is exactly the output without
isolation minus the free response of the state just before s(t) over [s(t), t]. The chunked
path (`kernels.h3_core`) subtracts exactly that, from the indices of `ChunkPlan`:
  - shift SSM (taps of lags < N <= P): its state is the P inputs before a start p; their response
    (the "previous chunk" band S1) reaches p .. p + N - 2 only: one (1 x P) @ (P x P) per start;
  - diagonal SSM: the state restarts at each start: the incoming state's response stops at a
    chunk's first start, the carry into the next chunk comes only from after its last start, and
    the in-chunk Toeplitz products that cross a start are subtracted (one P x P product per start).
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
    """One block's share of a `ChunkPlan`. Rows index the block's (C, ab B, P) chunk-major matrices;
    flat indices its (C, ab B P) views (k's block with its halo chunk first: (C, (ab + 1) B P))."""

    keep: torch.Tensor  # (1, ab, B, 1): the chunk has no start (the state carries through it)
    head: torch.Tensor  # (1, ab B, P): t before the row's first start (the incoming state reaches it)
    tail: torch.Tensor  # (1, ab B, P): i at or after the row's last start (feeds the outgoing state)
    pair_rows: torch.Tensor  # (n,) row of each start at an offset > 0
    pair_in: torch.Tensor  # (1, n, P): i before that start
    pair_out: torch.Tensor  # (1, n, P): t from that start to the row's next one
    shift_src: torch.Tensor  # (s P,) per start of the shift SSM, the P inputs before it (flat, k with halo)
    halo_sel: torch.Tensor  # which of them are in the halo chunk ...
    halo_at: torch.Tensor  # ... at these flat positions of it (C, B P)
    body_sel: torch.Tensor  # and which in the block's own chunks ...
    body_at: torch.Tensor  # ... at these flat positions of them (C, ab B P)
    shift_sel: torch.Tensor  # entries of the (s P) corrections that land in this block ...
    shift_dst: torch.Tensor  # ... at these flat positions of k'
    spill_sel: torch.Tensor  # entries that land in the next block's first chunk ...
    spill_dst: torch.Tensor  # ... at these flat positions of its k'


def _empty(device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


class ChunkPlan:
    """Per block of the chunked path (`kernels.h3_core._spans`), in its chunk-major row order
    (row a B + b = chunk a of sample b), where the starts are and what each one corrects:

    - diagonal SSM: per chunk, masks (its incoming-state response stops at its first start, its
      end state starts at its last, `keep` stops the carry; masks cost less than per-row products
      at any density) and the in-chunk starts (the Toeplitz products crossing them are subtracted);
    - shift SSM: for each start p >= 1, the P inputs before it and the outputs p .. p + P - 1
      of the same document below L that their response reaches (a start near a block's end
      reaches into the next block's first chunk: `spill`).
    The rest is sparse: one P x P product per start for each SSM.
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
        inner = ds.clone()
        inner[..., 0] = False
        b_idx, a_idx, o_idx = inner.nonzero(as_tuple=True)
        lag = torch.arange(P, device=dev)
        pair_in = (lag < o_idx.unsqueeze(-1)).to(dtype)
        pair_out = (count[b_idx, a_idx] == count[b_idx, a_idx, o_idx].unsqueeze(-1)).to(dtype)
        # Shift SSM: every start p >= 1, in global positions.
        sb, sp = doc_start.nonzero(as_tuple=True)
        keep_s = sp > 0
        sb, sp = sb[keep_s], sp[keep_s]
        gcount = doc_start.cumsum(-1)
        dst = sp.unsqueeze(-1) + lag  # (s, P)
        valid = (dst < L) & (gcount[sb.unsqueeze(-1), dst.clamp(max=L - 1)] == gcount[sb, sp].unsqueeze(-1))
        self.blocks = []
        for t0, _, tp in spans:
            a0, ab = t0 // P, tp // P
            sel = (a_idx >= a0) & (a_idx < a0 + ab)
            ssel = (sp >= t0) & (sp < t0 + tp)
            b_s, rel = sb[ssel].unsqueeze(-1), sp[ssel].unsqueeze(-1) - t0
            src = rel + lag  # positions p - P .. p - 1 relative to the block's halo chunk start (t0 - P)
            src = ((src // P) * B + b_s) * P + src % P
            rd = rel + lag  # outputs relative to t0
            flat = ((rd // P) * B + b_s) * P + rd % P
            ok = valid[ssel]
            inside, spill = ok & (rd < tp), ok & (rd >= tp)
            entries = torch.arange(rd.numel(), device=dev).view_as(rd)
            src, flat_entries = src.flatten(), entries.flatten()
            in_halo = src < B * P
            self.blocks.append(_BlockPlan(
                keep=keep[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab, B, 1),
                head=head[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab * B, P),
                tail=tail[:, a0 : a0 + ab].transpose(0, 1).reshape(1, ab * B, P),
                pair_rows=(a_idx[sel] - a0) * B + b_idx[sel],
                pair_in=pair_in[sel].unsqueeze(0),
                pair_out=pair_out[sel].unsqueeze(0),
                shift_src=src,
                halo_sel=flat_entries[in_halo],
                halo_at=src[in_halo],
                body_sel=flat_entries[~in_halo],
                body_at=src[~in_halo] - B * P,
                shift_sel=entries[inside],
                shift_dst=flat[inside],
                spill_sel=entries[spill],
                spill_dst=(b_s * P + rd - tp)[spill] if spill.any() else _empty(dev),
            ))
        # The last chunk, for the final state (`kernels.h3_core._h3_core_chunked`): (B, P), (B, 1).
        self.last_tail, self.last_keep = tail[:, -1], keep[:, -1]
