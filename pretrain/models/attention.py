"""Causal multi-head self-attention (PyTorch SDPA), optional rotary positions, KV cache, and
same-document masking for packed documents (`model.document_isolation`).

Isolation: a query sees the keys that are before it (causal) AND in its own document. How:
- No boundary among the keys (e.g. a short window inside one document): plain causal SDPA.
- CUDA from `FLEX_MIN_KEYS` keys: flex attention (`torch.nn.attention.flex_attention`, compiled)
  with a block mask built from the document ids: no L x S mask exists and blocks outside every
  document are skipped. Where flex attention cannot run (not importable, or attention dropout in
  training, which it lacks) the paths below run, and a log line says once that a long CUDA mask
  may be materialized.
- Otherwise (the CPU; CUDA below `FLEX_MIN_KEYS`), whole sequences (S == L): one causal SDPA call
  per document of each row (`segmented_same_document`): no mask, the causal kernel's work on each
  document only (less than plain causal attention), while documents average >= `SEGMENT_TOKENS`.
- Otherwise (many tiny documents; context-parallel chunks, whose queries are the last L of S
  keys): SDPA with a boolean mask, one block of `QUERY_BLOCK` queries at a time over the keys from
  their earliest document start (`blocked_same_document`): at most QUERY_BLOCK x S bools at once.
  With attention dropout there (training; no CP run has it) one SDPA call takes the whole
  (B, 1, L, S) boolean mask.
- Generation: the prefill masks like training; each decode step masks the cache entries before
  the row's current document (`InferenceParams.doc_reset` moves it, `doc_begin` keeps it).
Without a boundary map (`doc_start=None`) nothing changes: plain causal SDPA, no mask.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hippo.pretrain.models.documents import document_ids, last_document_start
from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears

log = logging.getLogger(__name__)

SEGMENT_TOKENS = 16
"""Per-document SDPA calls while documents average at least this many tokens (at most 8 per row
always pass); shorter ones go through the blocked mask (fewer, larger calls)."""
QUERY_BLOCK = 64
"""Queries per SDPA call of the blocked same-document attention."""
FLEX_MIN_KEYS = 2048
"""On CUDA, same-document masks over at least this many keys go through flex attention."""


def rotary_inv_freq(rotary_dim: int, base: float = 10000.0, device: torch.device | None = None) -> torch.Tensor:
    """(rotary_dim/2,) frequencies, computed as flash-attention's RotaryEmbedding does (same float32
    ops), so its stored `inv_freq` buffer and this agree bit for bit."""
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim)


def rotary_cos_sin(
    positions: torch.Tensor, rotary_dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, rotary_dim/2) for the given absolute positions."""
    angles = positions.float().unsqueeze(-1) * rotary_inv_freq(rotary_dim, base, positions.device)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, hd) by position: the first rotary_dim = 2 * cos.shape[-1] dims, their two
    halves paired (non-interleaved); the remaining head dims pass through unchanged."""
    rotary_dim = 2 * cos.shape[-1]
    x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1) if rotary_dim < x.shape[-1] else rotated


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        layer_idx: int,
        rotary: bool = False,
        rotary_dim: int | None = None,
        dropout: float = 0.0,
        linears: Linears = SINGLE_PROCESS,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d_model // n_head
        self.local_heads = linears.local(n_head, "model.n_head")
        self.rotary = rotary
        self.rotary_dim = rotary_dim or self.head_dim  # partial rotary: the leading dims only
        self.dropout = dropout
        self.tp_rng = linears.tp_rng
        self.sequence = linears.sequence
        # Separate Q, K, V maps: each column-parallel split lands on whole heads.
        self.q_proj = linears.column(d_model, d_model, bias=True)
        self.k_proj = linears.column(d_model, d_model, bias=True)
        self.v_proj = linears.column(d_model, d_model, bias=True)
        self.out_proj = linears.row(d_model, d_model, bias=True)
        self.out_proj.residual_out = True  # rescaled at init by 1/sqrt(2 n_layer)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.local_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)

    def forward(
        self, x: torch.Tensor, inference_params: InferenceParams | None = None, *, doc_start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D). `doc_start` (B, L) bool: True where a document begins (this
        rank's chunk of the map under context parallelism); None: plain causal attention."""
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        B, _, L, _ = q.shape  # under sequence parallelism x holds L / TP positions, q all L
        split = self.sequence.split and inference_params is None
        offset = inference_params.seqlen_offset if inference_params is not None else 0
        if split:
            offset = self.sequence.offset(L)
        if self.rotary:
            cos, sin = rotary_cos_sin(torch.arange(offset, offset + L, device=x.device), self.rotary_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if inference_params is not None:
            k, v = self._update_cache(inference_params, k, v, offset)
        dropout = self.dropout if self.training else 0.0
        mask = None
        if split:
            # A chunk of a sequence split over ranks: the keys and values of every chunk up to
            # this one; query i sees keys <= offset + i, the causal mask aligned to the lower
            # right. CUDA's flash / memory-efficient kernels apply it without materializing it;
            # on CPU SDPA builds the (L/CP x keys) mask (see BENCHMARKS.md, context parallelism).
            k, v = self.sequence.preceding(k, dim=2), self.sequence.preceding(v, dim=2)
            # Inside torch.compile the same mask as booleans: dynamo cannot build the CausalBias
            # tensor subclass (a graph break per call); the compiled graph materializes it anyway.
            S = k.shape[2]
            mask = (torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L) if torch.compiler.is_compiling()
                    else causal_lower_right(L, S))
        if doc_start is not None and L > 1:
            if inference_params is not None:  # a prefill: decode steps see only the last document
                inference_params.doc_begin = last_document_start(doc_start)
            # Under context parallelism the map of every chunk up to this one, gathered: the
            # keys' documents (a chunk's own ids would restart at 0 on every rank).
            doc = doc_start.to(torch.int32)
            doc = self.sequence.preceding(doc, dim=1) if split else doc
            with self._dropout_rng(dropout):
                y = same_document_attention(q, k, v, doc, dropout)
            if y is not None:
                return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))
            # No boundary among these keys: plain causal attention, below.
        elif inference_params is not None and L == 1:
            mask = self._decode_mask(inference_params, B, offset)
        # A single new token attends to the whole cache, so only the prefill needs the causal mask.
        with self._dropout_rng(dropout):  # attention dropout acts on this rank's heads: its own mask
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=L > 1 and mask is None, dropout_p=dropout
            )
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))

    def _dropout_rng(self, dropout: float):
        """The TP dropout stream's context, only where dropout draws from it: entering it reads and
        sets RNG states (a graph break in a compiled block), for nothing at p = 0."""
        return self.tp_rng() if dropout > 0 else contextlib.nullcontext()

    @staticmethod
    def _decode_mask(params: InferenceParams, B: int, offset: int) -> torch.Tensor | None:
        """(B, 1, 1, offset + 1) bool over the cache for the token at `offset`: the entries from
        the row's current document start on; None while no row has had a boundary."""
        if params.doc_reset is not None:
            begin = params.doc_begin if params.doc_begin is not None else params.doc_reset.new_zeros(B, dtype=torch.long)
            # Idempotent, so every attention layer of the model applies the same step safely.
            params.doc_begin = torch.where(params.doc_reset, offset, begin)
        if params.doc_begin is None:
            return None
        keys = torch.arange(offset + 1, device=params.doc_begin.device)
        return (keys >= params.doc_begin[:B, None])[:, None, None, :]

    def _update_cache(
        self, params: InferenceParams, k: torch.Tensor, v: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, L, hd = k.shape
        if offset == 0:
            shape = (params.max_batch_size, H, params.max_seqlen, hd)
            params.states[self.layer_idx] = (k.new_zeros(shape), v.new_zeros(shape))
            params.doc_begin = None
        k_cache, v_cache = params.states[self.layer_idx]
        if offset + L > params.max_seqlen:
            raise ValueError(f"KV cache of {params.max_seqlen} tokens exceeded (offset {offset} + {L})")
        k_cache[:B, :, offset : offset + L] = k
        v_cache[:B, :, offset : offset + L] = v
        return k_cache[:B, :, : offset + L], v_cache[:B, :, : offset + L]


def same_document_mask(q_doc: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, S) bool, True where query i (the last L of the S keys' positions) may see key j:
    j <= i and both in the same document. q_doc (B, L), k_doc (B, S): document ids."""
    L, S = q_doc.shape[-1], k_doc.shape[-1]
    causal = torch.ones(L, S, dtype=torch.bool, device=q_doc.device).tril(S - L)
    return ((q_doc[:, :, None] == k_doc[:, None, :]) & causal)[:, None]


def same_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor,
                            dropout: float) -> torch.Tensor | None:
    """Causal same-document attention (B, H, L, hd), the queries being the last L of the S keys;
    doc (B, S): 1 where a document begins. None where no key position but the first begins a
    document (plain causal attention is then exact, and the caller runs it). See the module
    docstring for which path runs where."""
    B, _, L, _ = q.shape
    S = k.shape[2]
    if use_flex(q, S, dropout):
        k_doc = document_ids(doc)
        return flex_same_document(q, k, v, k_doc[:, -L:], k_doc)
    if torch.compiler.is_compiling():
        # A compiled block (`train.compile`) is one graph: no host read of the boundaries, the
        # whole (L x S) same-document mask instead (exact; the segmented path's memory saving lost).
        k_doc = document_ids(doc)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=same_document_mask(k_doc[:, -L:], k_doc),
                                              dropout_p=dropout)
    cuts = doc[:, 1:].nonzero().tolist()  # one host read (the paths below need the boundaries)
    if not cuts:
        return None
    if S == L and len(cuts) + B <= B * max(8, L // SEGMENT_TOKENS):
        per_row: list[list[int]] = [[] for _ in range(B)]
        for b, j in cuts:
            per_row[b].append(j + 1)
        return segmented_same_document(q, k, v, per_row, dropout)
    k_doc = document_ids(doc)
    if dropout == 0.0:
        return blocked_same_document(q, k, v, k_doc[:, -L:], k_doc)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same_document_mask(k_doc[:, -L:], k_doc),
                                          dropout_p=dropout)


def segmented_same_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[list[int]],
                            dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each document, one causal SDPA call per document of each row
    (`starts[b]`: the positions > 0 where row b's documents begin): the causal kernel's own work
    on each document, no mask. Rows and documents are cut with split, whose gradient is one cat
    (slicing would give each call a zero tensor of the whole sequence)."""
    L = q.shape[2]
    rows = []
    # (1, H, l, hd) pieces: SDPA's fused CPU kernel takes 4-d inputs only (3-d ones run the math path).
    for qb, kb, vb, cuts in zip(q.split(1), k.split(1), v.split(1), starts, strict=True):
        edges = [0, *cuts, L]
        lengths = [b - a for a, b in zip(edges, edges[1:])]
        parts = [F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, dropout_p=dropout)
                 for qs, ks, vs in zip(qb.split(lengths, 2), kb.split(lengths, 2), vb.split(lengths, 2))]
        rows.append(torch.cat(parts, 2) if len(parts) > 1 else parts[0])
    return torch.cat(rows)


def blocked_same_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_doc: torch.Tensor,
                          k_doc: torch.Tensor, *, block: int = QUERY_BLOCK) -> torch.Tensor:
    """Causal same-document attention (B, H, L, hd), the queries being the last L of the S key
    positions, in blocks of `block` queries: each block attends, through a boolean mask, to the keys
    from the first position of its earliest query's document up to its last query. No dropout."""
    L, S = q.shape[2], k.shape[2]
    shift = S - L
    positions = torch.arange(S, device=k_doc.device)
    new_doc = torch.ones_like(k_doc, dtype=torch.bool)
    new_doc[:, 1:] = k_doc[:, 1:] != k_doc[:, :-1]
    first = torch.where(new_doc, positions, 0).cummax(-1).values[:, shift:]  # (B, L): each query's document start
    # The earliest start in a block is its first query's (starts never decrease): one host read.
    lows = first[:, ::block].amin(0).tolist()
    spans = [(a, min(a + block, L), lo) for a, lo in zip(range(0, L, block), lows)]
    return _BlockedAttention.apply(q, k, v, q_doc, k_doc, spans)


class _BlockedAttention(torch.autograd.Function):
    """The blocks' SDPA calls with their gradients summed in place. Autograd over slices would
    give every block's key/value gradient a zero tensor of the whole sequence (O(L^2 / block)
    memory traffic, slower than the unblocked mask); the backward recomputes each block's forward
    instead (SDPA keeps no state to reuse), about one attention forward more."""

    @staticmethod
    def forward(ctx, q, k, v, q_doc, k_doc, spans):
        ctx.save_for_backward(q, k, v, q_doc, k_doc)
        ctx.spans = spans
        out = q.new_empty(q.shape)
        shift = k.shape[2] - q.shape[2]
        for a, b, lo in spans:
            mask = _block_mask(q_doc, k_doc, a, b, lo, shift)
            out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo : shift + b],
                                                            v[:, :, lo : shift + b], attn_mask=mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, q_doc, k_doc = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        shift = k.shape[2] - q.shape[2]
        for a, b, lo in ctx.spans:
            mask = _block_mask(q_doc, k_doc, a, b, lo, shift)
            qb, kb, vb = (t.detach().requires_grad_() for t in (q[:, :, a:b], k[:, :, lo : shift + b],
                                                                v[:, :, lo : shift + b]))
            with torch.enable_grad():
                out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
            gq, gk, gv = torch.autograd.grad(out, (qb, kb, vb), grad[:, :, a:b])
            dq[:, :, a:b] = gq
            dk[:, :, lo : shift + b] += gk
            dv[:, :, lo : shift + b] += gv
        return dq, dk, dv, None, None, None


def _block_mask(q_doc: torch.Tensor, k_doc: torch.Tensor, a: int, b: int, lo: int, shift: int) -> torch.Tensor:
    """(B, 1, b - a, shift + b - lo) bool: queries a..b-1 (key positions shift + a ..) over keys
    lo .. shift + b - 1, causal and same-document."""
    q_pos = torch.arange(shift + a, shift + b, device=q_doc.device)
    k_pos = torch.arange(lo, shift + b, device=q_doc.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    return ((q_doc[:, a:b, None] == k_doc[:, None, lo : shift + b]) & causal)[:, None]


def use_flex(q: torch.Tensor, keys: int, dropout: float) -> bool:
    """Whether the same-document mask goes through flex attention (see the module docstring);
    logs once where a long CUDA mask is materialized instead."""
    if not q.is_cuda or keys < FLEX_MIN_KEYS:
        return False
    reason = "attention dropout in training" if dropout > 0 else None if _flex_attention() is not None else \
        "torch.nn.attention.flex_attention is not available"
    if reason is None:
        return True
    _warn_materialized(reason)
    return False


@functools.cache
def _warn_materialized(reason: str) -> None:
    log.warning("document isolation: no flex attention for >= %d keys on CUDA (%s): per-document SDPA calls, or "
                "boolean masks of %d queries x the keys (with attention dropout one whole L x S mask)",
                FLEX_MIN_KEYS, reason, QUERY_BLOCK)


@functools.cache
def _flex_attention():
    """flex_attention compiled (eager flex attention computes the whole score matrix), or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False)


def flex_same_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_doc: torch.Tensor,
                       k_doc: torch.Tensor) -> torch.Tensor:
    """Causal same-document attention (B, H, L, hd) through flex attention's block mask: blocks
    wholly outside every query's document are skipped, nothing L x S is stored."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, _, L, _ = q.shape
    S = k.shape[2]
    shift = S - L

    def same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + shift) & (q_doc[b, q_idx] == k_doc[b, kv_idx])

    block_mask = create_block_mask(same_document, B, None, L, S, device=q.device)
    return _flex_attention()(q, k, v, block_mask=block_mask)
