"""A Hippo language model (H3, S4D and attention mixers) as a `transformers` model.

A second implementation of the model, written from the math in plain PyTorch (no Hippo code): the
Hippo tests hold Hippo's logits and generations to it. Pre-norm blocks x + mixer(LN(x)), then
x + MLP(LN(x)); final LayerNorm; LM head tied to the token embedding.

H3 (head_dim 1), per channel c, on u -> q, k, v (linear maps with bias):
    k' = Ks * k + Dk k                 Ks[l] = sum_n Bs[n] Cs[n + l]   (shift SSM: N causal taps)
    s  = Kd * (k' v) + D (k' v)        Kd[l] = 2 Re(sum_m C_m dB_m dA_m^l)  (diagonal SSM)
    y  = W_o (q s)
with the bilinear discretization A = -exp(log_A_real) + i A_imag, dt = exp(log_dt),
dA = (1 + dt A / 2) / (1 - dt A / 2), dB = B dt / (1 - dt A / 2). S4D: y = GLU(W_o GELU(Kd * u + D u)).

A full forward convolves by FFT; cached decoding runs the recurrences (`HippoCache`: the shift
SSM's last N inputs, the diagonal SSM's complex state, and the attention layers' keys and
values). SSM parameters and arithmetic stay float32 (kernels and prefix states in float64) when
the model is loaded in bf16. Left padding is handled: padded positions are zeroed before every
SSM and masked out of attention, so they never enter a state.

Packed documents (`config.document_isolation`): a token after `config.eos_id` begins a new
document, and each position sees only its own document: every convolution runs on each document
alone, attention keys are limited to the query's document, and a cached decode clears the SSM
states before the first token of a new document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_hippo import HippoConfig

_CHANNEL_BLOCK = 256  # channels per float64 (channels, modes, L) power table: bounded memory


@dataclass
class HippoCausalLMOutput(ModelOutput):
    """Logits over the tokenizer's vocabulary. The cache is returned under both names that
    `generate` reads across transformers 5.x (`past_key_values`, later `cache`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: "HippoCache | None" = None
    cache: "HippoCache | None" = None


class HippoCache:
    """Recurrent state of every layer after `seen_tokens` tokens: constant in length for H3 and
    S4D layers, growing keys and values for attention layers."""

    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.seen_tokens = 0
        self.doc_ids: torch.Tensor | None = None  # (batch, seen) document of every seen position
        self.last_eos: torch.Tensor | None = None  # (batch,) the last seen token was EOS

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the states of the chosen beams (every state is batch-first)."""
        for i, states in self.layers.items():
            self.layers[i] = tuple(s.index_select(0, beam_idx.to(s.device)) for s in states)
        if self.doc_ids is not None:
            self.doc_ids = self.doc_ids.index_select(0, beam_idx.to(self.doc_ids.device))
            self.last_eos = self.last_eos.index_select(0, beam_idx.to(self.last_eos.device))


# ------------------------------------------------------------------------------- documents
def documents(input_ids: torch.Tensor, eos_id: int, cache: HippoCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(docs, starts), both (batch, L): the document index of each new position (continuing the
    cache's), and whether it begins a document (the token before it is EOS)."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    first = torch.zeros_like(input_ids[:, 0])
    if cache is not None and cache.doc_ids is not None:
        starts[:, 0] = cache.last_eos
        first = cache.doc_ids[:, -1]
    return first.unsqueeze(-1) + starts.long().cumsum(-1), starts


def per_document(conv, x: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
    """conv applied to each document of each row alone: x (batch, channels, L), docs (batch, L)."""
    if docs is None:
        return conv(x)
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        cuts = [0, *(torch.nonzero(docs[b, 1:] != docs[b, :-1]).flatten() + 1).tolist(), x.shape[-1]]
        for start, end in zip(cuts[:-1], cuts[1:]):
            out[b : b + 1, :, start:end] = conv(x[b : b + 1, :, start:end])
    return out


def _in_last_document(docs: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, 1, L) float: 1 where a position is in its row's last document (what a prefix state keeps)."""
    return None if docs is None else (docs == docs[:, -1:]).unsqueeze(1).float()


# ------------------------------------------------------------------------------------ the SSMs
def causal_conv(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[l] = sum_{j<=l} k[j] x[l-j] by FFT of size 2L: x (batch, channels, L), k (channels, *)."""
    L = x.shape[-1]
    k = k[..., :L]
    n = 2 * L
    return torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]


def shift_taps(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Ks[c, l] = sum_n B[c, n] C[c, n + l], l < N: (channels, N) from B, C (channels, N)."""
    N = B.shape[-1]
    windows = F.pad(C, (0, N - 1)).unfold(-1, N, 1)  # windows[c, l, n] = C[c, n + l], 0 past N
    return (windows * B.unsqueeze(1)).sum(-1)


class ShiftSSM(nn.Module):
    def __init__(self, channels: int, d_state: int):
        super().__init__()
        self.B = nn.Parameter(torch.zeros(channels, d_state))
        self.C = nn.Parameter(torch.zeros(channels, d_state))
        self.D = nn.Parameter(torch.zeros(channels))

    def taps(self) -> torch.Tensor:
        return shift_taps(self.B.float(), self.C.float())


class DiagonalSSM(nn.Module):
    def __init__(self, channels: int, d_state: int):
        super().__init__()
        modes = d_state // 2
        self.log_dt = nn.Parameter(torch.zeros(channels))
        self.log_A_real = nn.Parameter(torch.zeros(channels, modes))
        self.A_imag = nn.Parameter(torch.zeros(channels, modes))
        self.B = nn.Parameter(torch.zeros(channels, modes, 2))  # complex as (real, imag)
        self.C = nn.Parameter(torch.zeros(channels, modes, 2))
        self.D = nn.Parameter(torch.zeros(channels))

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dA, dB, C (channels, modes): discretized in float32 / complex64 as the model was trained
        (at L = 300, float64 here moves the logits by 5e-5: dA^l carries dA's rounding l times),
        returned as complex128 for the powers."""
        dt = torch.exp(self.log_dt.float()).unsqueeze(-1)
        half = dt * torch.complex(-torch.exp(self.log_A_real.float()), self.A_imag.float()) / 2
        dA = (1 + half) / (1 - half)
        dB = torch.view_as_complex(self.B.float().contiguous()) * dt / (1 - half)
        return dA.cdouble(), dB.cdouble(), torch.view_as_complex(self.C.float().contiguous()).cdouble()

    def kernel_and_state(self, x: torch.Tensor | None, L: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kd (channels, L) float32, and, for an input x (batch, channels, L), the state after it:
        sum_l dA^(L-1-l) dB x_l (batch, channels, modes) complex64. Powers dA^l in float64, a
        block of channels at a time."""
        dA, dB, C = self.discrete()
        steps = torch.arange(L, device=dA.device, dtype=torch.float64)
        kernels, states = [], []
        for c in range(0, dA.shape[0], _CHANNEL_BLOCK):
            blk = slice(c, c + _CHANNEL_BLOCK)
            powers = dA[blk].unsqueeze(-1) ** steps  # (channels, modes, L)
            kernels.append(2 * torch.einsum("cm,cml->cl", C[blk] * dB[blk], powers).real)
            if x is not None:
                rev = x[:, blk].double().flip(-1).to(powers.dtype)  # position L-1-l carries dA^l
                states.append(torch.einsum("bcl,cml->bcm", rev, powers) * dB[blk])
        state = torch.cat(states, dim=1).to(torch.complex64) if x is not None else None
        return torch.cat(kernels).float(), state

    def step_constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.to(torch.complex64) for t in self.discrete())


def diagonal_steps(ssm: DiagonalSSM, state: torch.Tensor, x: torch.Tensor,
                   starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, channels, T) float32 through the recurrence s' = dA s + dB x_t,
    y_t = 2 Re(sum_m C s') + D x_t; the state is cleared where `starts` (batch, T) begins a
    document. Returns y (batch, channels, T) and the new state."""
    dA, dB, C = ssm.step_constants()
    D = ssm.D.float()
    ys = []
    for t in range(x.shape[-1]):
        xt = x[..., t]
        if starts is not None:
            state = state * (~starts[:, t]).view(-1, 1, 1)
        state = dA * state + dB * xt.unsqueeze(-1)
        ys.append(2 * (C * state).sum(-1).real + D * xt)
    return torch.stack(ys, dim=-1), state


def _zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (batch, L, channels) with padded positions (mask 0) set to 0: they add nothing to a state."""
    return x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)


# ------------------------------------------------------------------------------------- mixers
class H3(nn.Module):
    def __init__(self, config: HippoConfig, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.layer_idx = layer_idx
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.shift_ssm = ShiftSSM(d, config.d_state)
        self.diag_ssm = DiagonalSSM(d, config.d_state)
        self.out_proj = nn.Linear(d, d)

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None, cache: HippoCache | None,
                docs: torch.Tensor | None = None, starts: torch.Tensor | None = None, **_) -> torch.Tensor:
        q = self.q_proj(u).float().transpose(1, 2)  # (batch, channels, L)
        k = _zero_padding(self.k_proj(u), mask).float().transpose(1, 2)
        v = self.v_proj(u).float().transpose(1, 2)
        taps, Dk = self.shift_ssm.taps(), self.shift_ssm.D.float()
        N, L = taps.shape[-1], k.shape[-1]
        if cache is not None and cache.seen_tokens > 0:
            window, state = cache.layers[self.layer_idx]
            shifted = []
            for t in range(L):  # window: the last N inputs of the shift SSM, newest last
                if starts is not None:  # a new document: nothing before it
                    window = window * (~starts[:, t]).view(-1, 1, 1)
                window = torch.cat((window[..., 1:], k[..., t : t + 1]), dim=-1)
                shifted.append((window * taps.flip(-1)).sum(-1) + Dk * k[..., t])
            s, state = diagonal_steps(self.diag_ssm, state, torch.stack(shifted, dim=-1) * v, starts)
        else:
            kv = (per_document(lambda x: causal_conv(x, taps), k, docs) + Dk.unsqueeze(-1) * k) * v
            last = _in_last_document(docs)  # a prefix state holds the last document only
            kernel, state = self.diag_ssm.kernel_and_state(
                None if cache is None else kv if last is None else kv * last, L)
            s = per_document(lambda x: causal_conv(x, kernel), kv, docs) + self.diag_ssm.D.float().unsqueeze(-1) * kv
            window = F.pad(k if last is None else k * last, (max(N - L, 0), 0))[..., -N:]
        if cache is not None:
            cache.layers[self.layer_idx] = (window, state)
        return self.out_proj((q * s).transpose(1, 2).to(u.dtype))


class S4D(nn.Module):
    """The paper's S4D baseline: a diagonal SSM per channel, GELU, gated output map."""

    def __init__(self, config: HippoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ssm = DiagonalSSM(config.d_model, config.d_state)
        self.out_proj = nn.Linear(config.d_model, 2 * config.d_model)

    def forward(self, u: torch.Tensor, mask: torch.Tensor | None, cache: HippoCache | None,
                docs: torch.Tensor | None = None, starts: torch.Tensor | None = None, **_) -> torch.Tensor:
        x = _zero_padding(u, mask).float().transpose(1, 2)
        if cache is not None and cache.seen_tokens > 0:
            y, state = diagonal_steps(self.ssm, cache.layers[self.layer_idx][0], x, starts)
        else:
            last = _in_last_document(docs)
            kernel, state = self.ssm.kernel_and_state(
                None if cache is None else x if last is None else x * last, x.shape[-1])
            y = per_document(lambda z: causal_conv(z, kernel), x, docs) + self.ssm.D.float().unsqueeze(-1) * x
        if cache is not None:
            cache.layers[self.layer_idx] = (state,)
        return F.glu(self.out_proj(F.gelu(y.transpose(1, 2).to(u.dtype))), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotary positions (base 10000) on the first `rotary_dim` dims of each head of x (B, H, L, hd),
    the two halves of those dims paired; positions (B, L)."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim)
    angles = (positions.float().unsqueeze(-1) * inv_freq).unsqueeze(1)  # (B, 1, L, rotary_dim / 2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: HippoConfig, layer_idx: int):
        super().__init__()
        d = config.d_model
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, d // config.n_head
        rotary = config.position_embedding == "rotary"
        self.rotary_dim = (config.rotary_dim or self.head_dim) if rotary else 0
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: HippoCache | None,
                positions: torch.Tensor, key_mask: torch.Tensor | None, key_docs: torch.Tensor | None = None,
                **_) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rotary_dim:
            q, k = rotate(q, positions, self.rotary_dim), rotate(k, positions, self.rotary_dim)
        past = cache.seen_tokens if cache is not None else 0
        if past:
            k_past, v_past = cache.layers[self.layer_idx]
            k, v = torch.cat((k_past, k), dim=2), torch.cat((v_past, v), dim=2)
        if cache is not None:
            cache.layers[self.layer_idx] = (k, v)
        S = k.shape[2]
        if key_mask is None and key_docs is None and past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        elif key_mask is None and key_docs is None and L == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # query i (at S - L + i) sees unpadded keys of its document up to itself, and always itself
            rows = torch.arange(S - L, S, device=x.device).unsqueeze(-1)
            cols = torch.arange(S, device=x.device)
            allowed = (cols <= rows).expand(B, 1, L, S)
            if key_mask is not None:
                allowed = (allowed & key_mask[:, None, None, -S:].bool()) | (cols == rows)
            if key_docs is not None:
                allowed = allowed & (key_docs[:, None, None, -S:] == key_docs[:, None, -L:, None])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: HippoConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.fc2 = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


MIXERS = {"h3": H3, "s4d": S4D, "attention": Attention}


class HippoBlock(nn.Module):
    def __init__(self, config: HippoConfig, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mixer = MIXERS[config.layer_mixers[layer_idx]](config, layer_idx)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, **context) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), **context)
        return x + self.mlp(self.norm2(x))


class HippoEmbedding(nn.Module):
    def __init__(self, config: HippoConfig):
        super().__init__()
        self.word = nn.Embedding(config.padded_vocab_size, config.d_model)
        learned = config.position_embedding == "learned"
        self.position = nn.Embedding(config.max_position_embeddings, config.d_model) if learned else None


# -------------------------------------------------------------------------------------- model
class HippoPreTrainedModel(PreTrainedModel):
    config_class = HippoConfig
    base_model_prefix = "hippo"
    _no_split_modules = ["HippoBlock"]
    # The SSM parameters set the dynamics (dt, A, the filters): bf16 would change the model.
    _keep_in_fp32_modules_strict = ["shift_ssm", "diag_ssm", "mixer.ssm"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The paper's initialization (a fresh model, or tensors a folder lacks)."""
        from transformers import initialization as init

        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ShiftSSM):
            init.copy_(module.B, F.one_hot(torch.zeros(module.B.shape[0], dtype=torch.long), module.B.shape[1]).float())
            bound = module.C.shape[-1] ** -0.5
            init.uniform_(module.C, -bound, bound)
            init.normal_(module.D)
        elif isinstance(module, DiagonalSSM):
            u = torch.rand(module.log_dt.shape)
            init.copy_(module.log_dt, math.log(1e-3) + u * (math.log(1e-1) - math.log(1e-3)))
            init.constant_(module.log_A_real, math.log(0.5))
            init.copy_(module.A_imag, math.pi * torch.arange(module.A_imag.shape[-1]).float().expand_as(module.A_imag))
            init.copy_(module.B, torch.tensor([1.0, 0.0]).expand_as(module.B))
            init.normal_(module.C, std=0.5**0.5)
            init.normal_(module.D)


class HippoForCausalLM(HippoPreTrainedModel, GenerationMixin):
    """Token ids -> logits over the tokenizer's vocabulary (the padded rows are dropped)."""

    def __init__(self, config: HippoConfig):
        super().__init__(config)
        self.embedding = HippoEmbedding(config)
        self.layers = nn.ModuleList(HippoBlock(config, i) for i in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own HippoCache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: HippoCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> HippoCausalLMOutput:
        """attention_mask (B, past + L), 1 for tokens and 0 for (left) padding; labels as
        input_ids (shifted inside), -100 ignored."""
        cache = past_key_values if past_key_values is not None else kwargs.get("cache", kwargs.get("cache_params"))
        if not isinstance(cache, HippoCache):
            cache = HippoCache() if (self.config.use_cache if use_cache is None else use_cache) else None
        h = self.embedding.word(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = h.shape[:2]
        past = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the plain causal paths
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
        else:
            positions = torch.arange(past, past + L, device=h.device).expand(B, L)
        if self.embedding.position is not None:
            if past + L > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {past + L} exceeds max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            h = h + self.embedding.position(positions)
        mask = attention_mask[:, -L:] if attention_mask is not None else None
        isolation = {}
        if getattr(self.config, "document_isolation", False):
            if input_ids is None:
                raise ValueError("document_isolation reads document ends from input_ids; inputs_embeds alone cannot")
            docs, starts = documents(input_ids, self.config.eos_id, cache if past else None)
            key_docs = torch.cat((cache.doc_ids, docs), dim=1) if past else docs
            isolation = {"docs": docs, "starts": starts if past else None, "key_docs": key_docs}
            if cache is not None:
                cache.doc_ids, cache.last_eos = key_docs, input_ids[:, -1] == self.config.eos_id
        for block in self.layers:
            h = block(h, mask=mask, cache=cache, positions=positions, key_mask=attention_mask, **isolation)
        if cache is not None:
            cache.seen_tokens += L
        h = self.norm_f(h[:, -logits_to_keep:] if logits_to_keep else h)
        logits = F.linear(h, self.embedding.word.weight[: self.config.vocab_size])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return HippoCausalLMOutput(loss=loss, logits=logits, past_key_values=cache, cache=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """The prompt on the first call, then only the tokens the cache has not seen."""
        cache = next((kwargs[n] for n in ("cache", "past_key_values", "cache_params")
                      if isinstance(kwargs.get(n), HippoCache)), None)
        inputs = {"attention_mask": attention_mask, "past_key_values": cache,
                  "use_cache": True if use_cache is None else use_cache}
        if cache is not None and cache.seen_tokens > 0:
            inputs["input_ids"] = input_ids[:, cache.seen_tokens:]
        elif inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
