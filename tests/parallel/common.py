"""Shared by the parallel tests and their worker: the tiny model and its data."""

from __future__ import annotations

import json

import torch

from hippo.parallel.layout import ParallelLayout
from hippo.pretrain.config import HippoConfig, apply_overrides, from_dict

# Tiny hybrid with both mixers: H3 at layers 0, 2, 3, attention at 1 (4 heads), vocab 64.
BASE_CONFIG = {
    "model": {"vocab_size": 64, "d_model": 32, "n_layer": 4, "n_head": 4, "attn_layer_idx": [1]},
    # 5 steps at lr 1e-3 move every weight by ~1e-3, far past float noise; clipping is active.
    # (At lr 1e-2 Adam's m / sqrt(v) turns 1e-7 gradient noise on near-zero gradients into
    # 1e-5 parameter differences: a property of Adam, not of the layout.)
    "optim": {"lr": 0.001, "warmup_fraction": 0.2, "grad_clip": 1.0, "weight_decay": 0.1},
    "train": {"steps": 5, "seq_len": 16, "micro_batch_size": 2, "global_batch_size": 8, "seed": 1234},
}


def config(overrides: list[str]) -> HippoConfig:
    """BASE_CONFIG with `key=value` overrides (a deep copy: BASE_CONFIG stays as it is)."""
    return from_dict(HippoConfig, apply_overrides(json.loads(json.dumps(BASE_CONFIG)), overrides))


# Under `model.document_isolation`, EOS tokens at fixed places of a 17-token window, so that
# documents begin on the context-parallel rank edges (positions 4, 8, 12 of 16 inputs), after two
# EOS in a row, at the last input and right after position 0.
EOS_AT = ((3, 7, 11, 12), (0, 15), (2, 3, 6, 10, 13))


def global_batches(cfg: HippoConfig) -> list[torch.Tensor]:
    """One (global_batch, seq_len + 1) token tensor per step, the same in every process."""
    gen = torch.Generator().manual_seed(99)
    t = cfg.train
    batches = [torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1), generator=gen)
               for _ in range(t.steps)]
    if cfg.model.document_isolation:
        for batch in batches:
            for row in range(batch.shape[0]):
                batch[row, list(EOS_AT[row % len(EOS_AT)])] = cfg.model.eos_id
    return batches


def rank_micro_batches(batch: torch.Tensor, layout: ParallelLayout, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's micro-batches of a global batch, split [dp][accumulation][micro]."""
    per_rank = batch.shape[0] // layout.data
    mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [(mb[:, :-1], mb[:, 1:]) for mb in mine.split(layout.micro_batch_size)]
