"""Causal multi-head self-attention (PyTorch SDPA), optional rotary positions, KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears


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

    def forward(self, x: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
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
        mask = None
        if split:
            # A chunk of a sequence split over ranks: the keys and values of every chunk up to
            # this one; query i sees keys <= offset + i, the causal mask aligned to the lower
            # right. CUDA's flash / memory-efficient kernels apply it without materializing it;
            # on CPU SDPA builds the (L/CP x keys) mask (see BENCHMARKS.md, context parallelism).
            k, v = self.sequence.preceding(k, dim=2), self.sequence.preceding(v, dim=2)
            mask = causal_lower_right(L, k.shape[2])
        # A single new token attends to the whole cache, so only the prefill needs the causal mask.
        with self.tp_rng():  # attention dropout acts on this rank's heads: its own mask
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=L > 1 and mask is None, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))

    def _update_cache(
        self, params: InferenceParams, k: torch.Tensor, v: torch.Tensor, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, L, hd = k.shape
        if offset == 0:
            shape = (params.max_batch_size, H, params.max_seqlen, hd)
            params.states[self.layer_idx] = (k.new_zeros(shape), v.new_zeros(shape))
        k_cache, v_cache = params.states[self.layer_idx]
        if offset + L > params.max_seqlen:
            raise ValueError(f"KV cache of {params.max_seqlen} tokens exceeded (offset {offset} + {L})")
        k_cache[:B, :, offset : offset + L] = k
        v_cache[:B, :, offset : offset + L] = v
        return k_cache[:B, :, : offset + L], v_cache[:B, :, : offset + L]
