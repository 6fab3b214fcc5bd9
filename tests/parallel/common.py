"""Shared by the parallel tests and their worker: the tiny model, the data, the launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pretrain.config import HippoConfig, Layout

ROOT = Path(__file__).resolve().parents[2]

# Tiny hybrid with both mixers: H3 at layers 0, 2, 3, attention at 1 (4 heads), vocab 64.
BASE_CONFIG = {
    "model": {"vocab_size": 64, "d_model": 32, "n_layer": 4, "n_head": 4, "attn_layer_idx": [1]},
    # 5 steps at lr 1e-3 move every weight by ~1e-3, far past float noise; clipping is active.
    # (At lr 1e-2 Adam's m / sqrt(v) turns 1e-7 gradient noise on near-zero gradients into
    # 1e-5 parameter differences: a property of Adam, not of the layout.)
    "optim": {"lr": 0.001, "warmup_fraction": 0.2, "grad_clip": 1.0, "weight_decay": 0.1},
    "train": {"steps": 5, "seq_len": 16, "micro_batch_size": 2, "global_batch_size": 8, "seed": 1234},
}


def global_batches(cfg: HippoConfig) -> list[torch.Tensor]:
    """One (global_batch, seq_len + 1) token tensor per step, the same in every process."""
    gen = torch.Generator().manual_seed(99)
    t = cfg.train
    return [torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1), generator=gen) for _ in range(t.steps)]


def rank_micro_batches(batch: torch.Tensor, layout: Layout, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's micro-batches of a global batch, split [dp][accumulation][micro]."""
    per_rank = batch.shape[0] // layout.data
    mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [(mb[:, :-1], mb[:, 1:]) for mb in mine.split(layout.micro_batch_size)]


def torchrun(nproc: int, argv: list[str], *, timeout: float = 600, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `argv` (a script and its arguments, or -m module ...) on `nproc` local ranks (gloo on
    CPU); nproc 0 runs it as a plain process, without a launcher. Raises with its output if it fails."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())] if nproc else []
    cmd = [sys.executable, *launcher, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
