"""Next-token loss with some positions left out (`train.eod_mask_loss`, Megatron's `--eod-mask-loss`).

A position is left out by setting its label to `IGNORE_INDEX` (PyTorch's and Hugging Face's
convention). Every loss of the repository goes through `kept_token_losses`, so the plain
cross entropy and the tensor-parallel one (which has no ignore index of its own) leave out the
same positions, and a left-out position gives no gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

IGNORE_INDEX = -100

TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits, labels) -> per-token loss of labels' shape (`Linears.cross_entropy`)."""


def eod_masked_labels(input_ids: torch.Tensor, labels: torch.Tensor, eos_id: int) -> torch.Tensor:
    """`labels` with `IGNORE_INDEX` where the *input* is the EOS: the prediction of a new document's
    first token from the end of the previous one is left out (Megatron's `--eod-mask-loss`)."""
    return labels.masked_fill(input_ids == eos_id, IGNORE_INDEX)


def kept_token_losses(cross_entropy: TokenLoss, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (labels' shape), 0 (and no gradient) where the label is `IGNORE_INDEX`."""
    keep = labels != IGNORE_INDEX
    return cross_entropy(logits, labels.where(keep, 0)).where(keep, 0.0)


def mean_kept_loss(cross_entropy: TokenLoss, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the positions whose label is not `IGNORE_INDEX` (0 where there is none: a window
    of nothing but EOS). With every position kept it is bitwise the plain mean on CPU."""
    kept = (labels != IGNORE_INDEX).sum()
    return kept_token_losses(cross_entropy, logits, labels).sum() / kept.clamp(min=1)
