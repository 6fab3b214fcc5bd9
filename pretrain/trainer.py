"""The training loop behind `hippo train`: one process or many ranks, resumable at every checkpoint.

Per step: this rank's micro-batches from the data stream, one DeepSpeed optimizer step, metrics
(console on rank 0, `metrics.jsonl`, MLflow), then evaluation and checkpoints when due. A stop
request (SIGTERM/SIGINT, as schedulers send before preemption) finishes the step, writes a
checkpoint and returns; so does a run of non-finite steps, after saving the last good state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.config import ConfigError, HippoConfig, to_dict
from pretrain.flops import train_flops_per_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    step: int
    """Optimizer steps done (including those of earlier runs this one resumed)."""
    losses: dict[int, float]
    """Training loss of each step this process ran."""
    val_loss: float | None
    stopped_by: str
    """'completed', 'signal', 'exit interval' or 'non-finite'."""
    checkpoint: Path | None


def _single_process_env() -> None:
    """Let a plain `hippo train` (no launcher) join a one-rank job."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class StopRequest:
    """SIGTERM/SIGINT set a flag; ranks agree on it every step, so all stop after the same one."""

    def __init__(self) -> None:
        self.signalled = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.signalled:
            log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.signalled = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor(float(self.signalled), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class MetricsFile:
    """`metrics.jsonl` in the run folder (rank 0); on resume, lines past the checkpoint are dropped
    (the resumed run recomputes those steps)."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int):
        self.path = path if enabled else None
        if self.path is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _micro_batches(batches: Iterator[torch.Tensor], count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b[:, :-1], b[:, 1:]) for b in islice(batches, count)]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("hippo-pretrain", "torch", "deepspeed", "megatron-core", "webdataset", "mlflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def train(cfg: HippoConfig, run_dir: Path, *, resume: str | None = None) -> TrainResult:
    """Train `cfg` into `run_dir`, resuming from its latest checkpoint (or `resume`) if any."""
    from data_pipeline.stream import build_stream
    from parallel.engine import TrainEngine
    from parallel.gather import full_parameters
    from parallel.groups import destroy_parallel, init_parallel
    from pretrain.export import save_export
    from pretrain.tracking import Tracker

    if cfg.data is None:
        raise ConfigError("hippo train needs data.paths: prepared folders from `hippo data prepare`")
    _single_process_env()
    layout = cfg.layout(int(os.environ["WORLD_SIZE"]))  # refuse a bad layout before any work
    _check_data_fits_model(cfg)
    state = init_parallel(layout, cfg.train.seed)
    rank0 = state.rank == 0
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    ckpt = checkpoint.resolve(resume, ckpt_dir)
    universal = ckpt is not None and not checkpoint.same_layout(ckpt, layout)
    if universal and rank0:
        checkpoint.convert_to_universal(ckpt)
    dist.barrier()
    engine = TrainEngine(cfg, state, load_universal=universal)
    stream = build_stream(cfg.data, dp_rank=state.dp_rank, dp_size=layout.data,
                          micro_batch_size=layout.micro_batch_size, global_batch_size=layout.global_batch_size)
    step, skipped_total, run_id = 0, 0, None
    if ckpt is not None:
        checkpoint.load(engine.engine, ckpt, rank=state.rank, world_size=layout.world_size, universal=universal)
        stream.load_state_dict(ckpt.state["data"])
        step, skipped_total = ckpt.step, ckpt.state["skipped_steps"]
        # The same MLflow run continues only in its own run folder (its store); --resume from
        # another folder starts a new run.
        if ckpt.folder.resolve() == ckpt_dir.resolve():
            run_id = ckpt.state.get("mlflow_run_id")
        if rank0:
            log.info("resumed from %s at step %d (%d samples consumed)", ckpt.path, step, stream.consumed_samples)

    t = cfg.tracking
    tracker = Tracker(run_dir, enabled=rank0 and t.enabled, experiment=t.experiment, run_name=run_dir.name,
                      run_id=run_id, tracking_uri=t.tracking_uri, system_metrics=t.system_metrics)
    if run_id is None:
        tracker.log_params({"config": to_dict(cfg), "layout": dataclasses.asdict(layout),
                            "world_size": layout.world_size, "versions": _versions()})
        if rank0:
            (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
            tracker.log_artifact(run_dir / "config.json")
    metrics_file = MetricsFile(run_dir / "metrics.jsonl", enabled=rank0, resume_step=step)
    validation = _Validation(cfg, state, engine)
    flops_per_token = train_flops_per_token(cfg.model, cfg.train.seq_len)
    tokens_per_step = layout.global_batch_size * cfg.train.seq_len
    stop = StopRequest()

    def save(reason: str) -> Path:
        data_state = stream.state_dict()
        path = checkpoint.save(engine.engine, ckpt_dir, step, {
            "data": data_state, "skipped_steps": skipped_total, "mlflow_run_id": tracker.run_id,
            "layout": dataclasses.asdict(layout), "config": to_dict(cfg), "reason": reason,
        }, keep_last=cfg.checkpoint.keep_last, rank=state.rank)
        if rank0:
            log.info("checkpoint %s (%s)", path, reason)
        return path

    try:  # an exception still ends the MLflow run (FAILED) with its queued metrics sent
        losses: dict[int, float] = {}
        val_loss: float | None = None
        stopped_by, last_ckpt, consecutive_skips = "completed", None, 0
        batches = iter(stream)
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            lr = engine.lr
            loss = engine.train_batch(_micro_batches(batches, layout.grad_accum_steps))
            seconds = time.perf_counter() - t0
            step += 1
            losses[step] = loss
            consecutive_skips = consecutive_skips + 1 if engine.last_step_skipped else 0
            skipped_total += engine.last_step_skipped
            tokens_per_s = tokens_per_step / seconds
            metrics = {"loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "step_seconds": seconds,
                       "samples_consumed": stream.consumed_samples, "skipped_steps": skipped_total,
                       "flops_per_token": flops_per_token}
            if engine.grad_norm is not None:
                metrics["grad_norm"] = engine.grad_norm
            if cfg.train.peak_flops > 0:
                metrics["mfu"] = flops_per_token * tokens_per_s / (cfg.train.peak_flops * layout.world_size)
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0 and step < cfg.train.steps:
                val_loss = validation.run()
                if val_loss is not None:
                    metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
            tracker.log_metrics(finite, step)
            metrics_file.write({"step": step, **metrics})
            if rank0 and (step % cfg.train.log_interval == 0 or step == cfg.train.steps):
                log.info(_console_line(step, cfg.train.steps, metrics, engine.last_step_skipped))

            if consecutive_skips >= cfg.train.max_skipped_steps:
                last_ckpt = save("non-finite")
                log.error("%d steps in a row had a non-finite loss or gradient norm (last loss %s); stopped after "
                          "saving the last good state to %s. Lower optim.lr or check the data.",
                          consecutive_skips, loss, last_ckpt)
                stopped_by = "non-finite"
                break
            signalled = stop.agreed(state.device)
            exiting = bool(cfg.train.exit_interval) and step % cfg.train.exit_interval == 0 and step < cfg.train.steps
            interval = cfg.checkpoint.interval
            if signalled or exiting or step == cfg.train.steps or (interval and step % interval == 0):
                last_ckpt = save("signal" if signalled else "exit interval" if exiting else "interval")
            if signalled or exiting:
                stopped_by = "signal" if signalled else "exit interval"
                break

        if stopped_by == "completed":
            val_loss = validation.run()
            if val_loss is not None:
                tracker.log_metrics({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}, step)
                if rank0:
                    log.info("validation after step %d: loss %.4f, perplexity %.2f", step, val_loss, math.exp(min(val_loss, 50.0)))
            params = full_parameters(engine.module, state)
            if rank0:
                export = save_export(run_dir / "export", params, cfg.model, tokenizer=stream.tokenizer_spec, step=step)
                tracker.set_tags({"export": str(export.resolve())})
                log.info("consolidated model for one process: %s", export)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED" if stopped_by != "non-finite" else "FAILED")
    destroy_parallel()
    return TrainResult(step, losses, val_loss, stopped_by, last_ckpt)


def _check_data_fits_model(cfg: HippoConfig) -> None:
    from data_pipeline.manifest import load_manifest

    for path in cfg.data.paths:
        m = load_manifest(path)
        if m.seq_len != cfg.train.seq_len or m.tokenizer["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(
                f"{path} holds windows for seq_len={m.seq_len} from a {m.tokenizer['vocab_size']}-token vocabulary; "
                f"set train.seq_len={m.seq_len} and model.vocab_size >= {m.tokenizer['vocab_size']}"
            )


def _console_line(step: int, total: int, m: dict[str, float], skipped: bool) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3g}"]
    if "grad_norm" in m:
        parts.append(f"grad {m['grad_norm']:.3f}")
    parts += [f"{m['tokens_per_s']:,.0f} tok/s", f"{m['step_seconds']:.2f} s/step", f"samples {m['samples_consumed']:,}"]
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
    if skipped:
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


class _Validation:
    """Mean loss over the first `train.eval_batches` global batches of the validation split."""

    def __init__(self, cfg: HippoConfig, state, engine) -> None:
        from data_pipeline.stream import build_stream

        self.engine, self.grad_accum = engine, state.layout.grad_accum_steps
        try:
            self.stream = build_stream(
                dataclasses.replace(cfg.data, split="validation"), dp_rank=state.dp_rank, dp_size=state.layout.data,
                micro_batch_size=state.layout.micro_batch_size, global_batch_size=state.layout.global_batch_size,
                one_pass=True, max_batches=cfg.train.eval_batches)
        except (ValueError, KeyError) as e:
            if state.rank == 0:
                log.warning("no validation: %s (prepare with --val-fraction or --val-inputs)", e)
            self.stream = None

    def run(self) -> float | None:
        if self.stream is None:
            return None
        batches = iter(self.stream)
        losses = []
        while micro := _micro_batches(batches, self.grad_accum):
            losses.append(self.engine.eval_batch(micro))
        return sum(losses) / len(losses)
