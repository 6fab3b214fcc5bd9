"""The training loop behind `hippo train`: one process or many ranks, resumable at every checkpoint.

Per step: this rank's micro-batches from the data stream, one DeepSpeed optimizer step, metrics
(console on rank 0, `metrics.jsonl`, MLflow), then evaluation and checkpoints when due. A stop
request (SIGTERM/SIGINT, as schedulers send before preemption) finishes the step, writes a
checkpoint and returns; so does a run of non-finite steps, after saving the last good state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from hippo.parallel.engine import TrainEngine
from hippo.parallel.gather import full_parameters
from hippo.parallel.groups import ParallelState, destroy_parallel, init_parallel
from hippo.pretrain.builders import Validation, build_engine, build_tracker, build_train_stream, micro_batches
from hippo.pretrain.checkpoint import Checkpoint, CheckpointManager, SavedState
from hippo.pretrain.config import ConfigError, HippoConfig, to_dict
from hippo.pretrain.export import save_export
from hippo.pretrain.metrics import MetricsFile, StepReporter, Throughput, step_metrics, validation_metrics
from hippo.pretrain.stopping import StopReason, StopRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    step: int
    """Optimizer steps done (including those of earlier runs this one resumed)."""
    losses: dict[int, float]
    """Training loss of each step this process ran."""
    val_loss: float | None
    stopped_by: StopReason
    checkpoint: Path | None


def train(cfg: HippoConfig, run_dir: Path, *, resume: str | None = None) -> TrainResult:
    """Train `cfg` into `run_dir`, resuming from its latest checkpoint (or `resume`) if any."""
    if cfg.data is None:
        raise ConfigError("hippo train needs data.paths: prepared folders from `hippo data prepare`")
    _join_single_process_job()
    layout = cfg.layout(int(os.environ["WORLD_SIZE"]))  # refuse a bad layout before any work
    _check_data_fits_model(cfg)
    state = init_parallel(layout, cfg.train.seed)
    run_dir = _make_run_dir(Path(run_dir), state)
    checkpoints = CheckpointManager(run_dir / "checkpoints", rank=state.rank, keep_last=cfg.checkpoint.keep_last)
    ckpt = checkpoints.resolve(resume)
    universal = checkpoints.prepare_load(ckpt, layout)
    engine = build_engine(cfg, state, load_universal=universal)
    stream = build_train_stream(cfg, state)
    step, skipped, run_id = _resume(checkpoints, ckpt, engine, stream, universal=universal) if ckpt else (0, 0, None)
    tracker = build_tracker(cfg, run_dir, state, run_id=run_id)
    report = StepReporter(tracker, MetricsFile(run_dir / "metrics.jsonl", enabled=state.rank == 0, resume_step=step),
                          total_steps=cfg.train.steps, log_interval=cfg.train.log_interval, console=state.rank == 0)
    validation, throughput = Validation(cfg, state, engine), Throughput.of(cfg, layout.world_size, layout.global_batch_size)
    stop, losses, val_loss, last_ckpt, stopped_by, skips_in_a_row = StopRequest(), {}, None, None, StopReason.COMPLETED, 0

    def save(reason: str) -> Path:
        saved = SavedState(step=step, data=stream.state_dict(), skipped_steps=skipped, mlflow_run_id=tracker.run_id,
                           layout=dataclasses.asdict(layout), config=to_dict(cfg), reason=reason)
        path = checkpoints.save(engine.engine, saved)
        if state.rank == 0:
            log.info("checkpoint %s (%s)", path, reason)
        return path

    try:  # an exception still ends the MLflow run (FAILED) with its queued metrics sent
        batches = iter(stream)
        while step < cfg.train.steps:
            lr = engine.lr
            loss, seconds = train_step(engine, batches, layout.grad_accum_steps)
            step, skipped = step + 1, skipped + engine.last_step_skipped
            losses[step] = loss
            skips_in_a_row = skips_in_a_row + 1 if engine.last_step_skipped else 0
            metrics = step_metrics(loss=loss, lr=lr, seconds=seconds, grad_norm=engine.grad_norm, skipped_steps=skipped,
                                   samples_consumed=stream.consumed_samples, throughput=throughput)
            if _every(cfg.train.eval_interval, step) and step < cfg.train.steps:
                val_loss = validation.run()
                metrics.update(validation_metrics(val_loss))
            report(step, metrics, skipped=engine.last_step_skipped)
            reason = stop_reason(cfg, step, skips_in_a_row, stop, state.device)
            if reason or step == cfg.train.steps or _every(cfg.checkpoint.interval, step):
                last_ckpt = save(reason or "interval")
            if reason:
                stopped_by = reason
                if reason is StopReason.NON_FINITE:
                    log.error("%d steps in a row had a non-finite loss or gradient norm (last loss %s); stopped after "
                              "saving the last good state to %s. Lower optim.lr or check the data.",
                              skips_in_a_row, loss, last_ckpt)
                break
        if stopped_by is StopReason.COMPLETED:
            val_loss = _finish(cfg, run_dir, step, engine, state, validation, tracker, stream.tokenizer_spec)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FAILED" if stopped_by is StopReason.NON_FINITE else "FINISHED")
    destroy_parallel()
    return TrainResult(step, losses, val_loss, stopped_by, last_ckpt)


def train_step(engine: TrainEngine, batches: Iterator[torch.Tensor], grad_accum_steps: int) -> tuple[float, float]:
    """One optimizer step over this rank's next micro-batches: (global-batch mean loss, seconds)."""
    t0 = time.perf_counter()
    loss = engine.train_batch(micro_batches(batches, grad_accum_steps))
    return loss, time.perf_counter() - t0


def stop_reason(cfg: HippoConfig, step: int, skips_in_a_row: int, stop: StopRequest,
                device: torch.device) -> StopReason | None:
    """Why the run stops after `step`, or None to go on. Collective (the stop request is agreed)."""
    if skips_in_a_row >= cfg.train.max_skipped_steps:
        return StopReason.NON_FINITE
    if stop.agreed(device):
        return StopReason.SIGNAL
    if _every(cfg.train.exit_interval, step) and step < cfg.train.steps:
        return StopReason.EXIT_INTERVAL
    return None


def _every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


def _resume(checkpoints: CheckpointManager, ckpt: Checkpoint, engine: TrainEngine, stream, *,
            universal: bool) -> tuple[int, int, str | None]:
    """Load `ckpt` into the engine and the stream: (step, skipped steps, MLflow run id to continue)."""
    saved = checkpoints.load(engine.engine, ckpt, world_size=dist.get_world_size(), universal=universal)
    stream.load_state_dict(saved.data)
    # The same MLflow run continues only in its own run folder (its store); --resume from
    # another folder starts a new run.
    same_run = ckpt.folder.resolve() == checkpoints.folder.resolve()
    if checkpoints.rank == 0:
        log.info("resumed from %s at step %d (%d samples consumed)", ckpt.path, saved.step, stream.consumed_samples)
    return saved.step, saved.skipped_steps, saved.mlflow_run_id if same_run else None


def _finish(cfg: HippoConfig, run_dir: Path, step: int, engine: TrainEngine, state: ParallelState,
            validation: Validation, tracker, tokenizer: str) -> float | None:
    """After the last step: the final validation, and the consolidated export (written by rank 0)."""
    val_loss = validation.run()
    if val_loss is not None:
        tracker.log_metrics(validation_metrics(val_loss), step)
        if state.rank == 0:
            m = validation_metrics(val_loss)
            log.info("validation after step %d: loss %.4f, perplexity %.2f", step, m["val_loss"], m["val_ppl"])
    params = full_parameters(engine.module, state)
    if state.rank == 0:
        export = save_export(run_dir / "export", params, cfg.model, tokenizer=tokenizer, step=step)
        tracker.set_tags({"export": str(export.resolve())})
        log.info("consolidated model for one process: %s", export)
    return val_loss


def _join_single_process_job() -> None:
    """Let a plain `hippo train` (no launcher) join a one-rank job."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _make_run_dir(run_dir: Path, state: ParallelState) -> Path:
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return run_dir


def _check_data_fits_model(cfg: HippoConfig) -> None:
    from hippo.data_pipeline.manifest import load_manifest

    for path in cfg.data.paths:
        m = load_manifest(path)
        if m.seq_len != cfg.train.seq_len or m.tokenizer["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(
                f"{path} holds windows for seq_len={m.seq_len} from a {m.tokenizer['vocab_size']}-token vocabulary; "
                f"set train.seq_len={m.seq_len} and model.vocab_size >= {m.tokenizer['vocab_size']}"
            )
