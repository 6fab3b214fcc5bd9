"""Loss and perplexity of an exported model on a prepared split, on one process."""

from __future__ import annotations

from pathlib import Path

import torch

from hippo.data_pipeline.config import DataConfig
from hippo.data_pipeline.stream import build_stream
from hippo.pretrain.export import load_export


@torch.no_grad()
def evaluate_export(folder: Path, data_paths: list[str], *, split: str = "validation", batch_size: int = 8,
                    max_batches: int | None = None) -> tuple[float, int]:
    """Mean next-token loss over the split (one pass, manifest order) and the tokens it covered."""
    model, _ = load_export(folder)
    stream = build_stream(DataConfig(paths=list(data_paths), split=split), dp_rank=0, dp_size=1,
                          micro_batch_size=batch_size, global_batch_size=batch_size, one_pass=True,
                          max_batches=max_batches)
    total, tokens = 0.0, 0
    for batch in stream:
        n = batch[:, 1:].numel()
        total += model.loss(batch[:, :-1], batch[:, 1:]).item() * n
        tokens += n
    return total / tokens, tokens
