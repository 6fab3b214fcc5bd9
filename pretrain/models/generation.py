"""Autoregressive generation in recurrent mode: prefill the prompt by convolution (and full
attention), then one token per step through H3/S4D recurrences and attention KV caches.
Constant memory per H3 layer in the generated length; only attention layers grow a cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hippo.pretrain.models.config import ConfigError
from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.lm import HippoLM


@dataclass(kw_only=True)
class SamplingConfig:
    """How the next token is picked from the logits."""

    greedy: bool = False
    """Always the most likely token; temperature, top_k and top_p are then unused."""
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1.0: all)."""

    def __post_init__(self) -> None:
        """Messages name the `hippo generate` options, the way most users set these."""
        if self.temperature <= 0 and not self.greedy:
            raise ConfigError(f"--temperature (temperature) must be > 0, got {self.temperature}; "
                              "for the most likely token at every step use --greedy")
        if self.top_k < 0:
            raise ConfigError(f"--top-k (top_k) must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p (top_p) must be in (0, 1] (1 keeps every token), got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: HippoLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Continue `prompt` (B, Lp) by up to `max_new_tokens`; returns (B, Lp + new).

    Padded vocabulary entries (>= vocab_size) are never sampled. Stops early once every
    sequence has produced `eos_id` or been declared done by `stop` (called with the new tokens
    so far, (B, n); returns (B,) bools: stop strings are text, which only the caller can decode).
    """
    sampling = sampling or SamplingConfig(greedy=True)
    B, Lp = prompt.shape
    if Lp < 1:
        raise ValueError("generation needs a prompt of at least one token")
    params = InferenceParams(max_seqlen=Lp + max_new_tokens, max_batch_size=B)
    logits = model(prompt, params, last_only=True)[:, -1]
    out = [prompt]
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        if vocab_size is not None:
            logits[:, vocab_size:] = float("-inf")
        token = sample_next(logits, sampling, generator)
        out.append(token.unsqueeze(1))
        if eos_id is not None:
            finished |= token == eos_id
        if stop is not None:
            finished |= stop(torch.cat(out[1:], dim=1))
        if bool(finished.all()):
            break
        if i + 1 == max_new_tokens:
            break
        params.seqlen_offset = Lp + i
        logits = model(token.unsqueeze(1), params)[:, -1]
    return torch.cat(out, dim=1)
