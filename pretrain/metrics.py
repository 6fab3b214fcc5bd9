"""What each training step reports: the metrics record, its console line, `metrics.jsonl`."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hippo.pretrain.config import HippoConfig
from hippo.pretrain.flops import train_flops_per_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throughput:
    """The run's constants behind tokens/s and MFU."""

    tokens_per_step: int
    flops_per_token: float
    peak_flops_total: float
    """Peak FLOP/s of all devices together; 0: MFU is not reported."""

    @classmethod
    def of(cls, cfg: HippoConfig, world_size: int, global_batch_size: int) -> Throughput:
        from hippo.parallel.runtime import detected_peak_flops

        peak = cfg.train.peak_flops or detected_peak_flops()  # 0: from the GPU's name (0 on CPU)
        return cls(global_batch_size * cfg.train.seq_len, train_flops_per_token(cfg.model, cfg.train.seq_len),
                   peak * world_size)


def step_metrics(*, loss: float, lr: float, seconds: float, grad_norm: float | None, skipped_steps: int, stream,
                 throughput: Throughput) -> dict[str, float]:
    """One step's record; `stream`: the training data stream (samples read, unreadable ones replaced)."""
    tokens_per_s = throughput.tokens_per_step / seconds
    metrics = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "step_seconds": seconds,
               "samples_consumed": stream.consumed_samples, "corrupt_samples": stream.corrupt_samples,
               "skipped_steps": skipped_steps, "flops_per_token": throughput.flops_per_token}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    if throughput.peak_flops_total > 0:
        metrics["mfu"] = throughput.flops_per_token * tokens_per_s / throughput.peak_flops_total
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # the run's peak so far, this rank
        metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


def validation_metrics(val_loss: float | None) -> dict[str, float]:
    if val_loss is None:
        return {}
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def console_line(step: int, total: int, m: dict[str, float], skipped: bool) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3g}"]
    if "grad_norm" in m:
        parts.append(f"grad {m['grad_norm']:.3f}")
    parts += [f"{m['tokens_per_s']:,.0f} tok/s", f"{m['step_seconds']:.2f} s/step", f"samples {m['samples_consumed']:,}"]
    if m.get("corrupt_samples"):
        parts.append(f"unreadable {m['corrupt_samples']:,}")
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
    if skipped:
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


class MetricsFile:
    """`metrics.jsonl` in the run folder (rank 0); on resume, lines past the checkpoint are dropped
    (the resumed run recomputes those steps), and so is a line torn by a crash or a full disk. The
    file is replaced whole (a temporary file renamed), so a failed rewrite leaves it as it was."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int):
        self.path = path if enabled else None
        if self.path is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> float:
    """A record's step; infinity (never kept) for an empty or torn line."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


class StepReporter:
    """Each step's metrics go to MLflow (finite values only), `metrics.jsonl`, and every
    `log_interval` steps (and the last) to the console of rank 0."""

    def __init__(self, tracker, metrics_file: MetricsFile, *, total_steps: int, log_interval: int, console: bool):
        self.tracker, self.metrics_file = tracker, metrics_file
        self.total_steps, self.log_interval, self.console = total_steps, log_interval, console

    def __call__(self, step: int, metrics: dict[str, float], *, skipped: bool) -> None:
        self.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step)
        self.metrics_file.write({"step": step, **metrics})
        if self.console and (step % self.log_interval == 0 or step == self.total_steps):
            log.info(console_line(step, self.total_steps, metrics, skipped))
