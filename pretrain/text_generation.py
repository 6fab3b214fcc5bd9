"""Text in, text out: many prompts through the recurrent generator, in batches.

Prompts of one batch have the same token length, so nothing is padded: a pad token would run
through the SSM state and change every later position (left padding is not neutral for an SSM).
Batches are formed by length and the results come back in the prompts' order.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from hippo.data_pipeline.tokenizer import Tokenizer
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.generation import SamplingConfig, generate


def generate_texts(model: HippoLM, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int,
                   sampling: SamplingConfig, batch_size: int = 1, generator: torch.Generator | None = None) -> list[str]:
    """The continuation (without the prompt) of each prompt, in order."""
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i + 1} is empty after tokenization: generation needs at least one token")
        by_length[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            ids = torch.tensor([encoded[i] for i in batch], device=device)
            tokens = generate(model, ids, max_new_tokens, sampling, vocab_size=model.cfg.vocab_size,
                              generator=generator, eos_id=tokenizer.eos_id)
            for i, row in zip(batch, tokens[:, length:].tolist()):
                out[i] = tokenizer.decode(row)
    return out
