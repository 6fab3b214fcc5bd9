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

from hippo.data_pipeline.sample_order import check_saved_order
from hippo.parallel.engine import TrainEngine
from hippo.parallel.gather import stage_full_parameters
from hippo.parallel.groups import ParallelState, destroy_parallel, init_parallel
from hippo.parallel.layout import ParallelLayout
from hippo.pretrain.builders import (TaskEvaluation, Validation, build_engine, build_tracker, build_train_stream,
                                     check_init_from, micro_batches)
from hippo.pretrain.checkpoint import Checkpoint, CheckpointManager, SavedState
from hippo.pretrain.config import ConfigError, HippoConfig, resume_changes, to_dict
from hippo.pretrain.export import save_export, save_export_by_stage
from hippo.pretrain.run_lock import RunLock, RunLockedError
from hippo.pretrain.metrics import MetricsFile, StepReporter, Throughput, step_metrics, validation_metrics
from hippo.pretrain.stopping import StopReason, StopRequest, WallClock

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
    signal: int = 0
    """The signal that stopped the run (SIGNAL), the same on every rank; 0 otherwise."""


def train(cfg: HippoConfig, run_dir: Path, *, resume: str | None = None, allow_config_change: bool = False,
          init_from: Path | None = None) -> TrainResult:
    """Train `cfg` into `run_dir`, resuming from its latest checkpoint (or `resume`) if any, else
    starting from the weights of the export `init_from` (or the seeded initialization)."""
    clock = WallClock(cfg.train.time_limit, time.monotonic())
    layout, tokenizer_id, data_eos_id = _checked_layout(cfg)  # refuse a bad layout or data before any work
    state = init_parallel(layout, cfg.train.seed)
    run_dir, lock = Path(run_dir), _claim_run_dir(Path(run_dir), state)
    checkpoints = CheckpointManager(run_dir / "checkpoints", rank=state.rank, keep_last=cfg.checkpoint.keep_last)
    ckpt = checkpoints.resolve(resume)
    _check_data_order(ckpt)
    init_from = _check_resumable(cfg, ckpt, tokenizer_id, allow_config_change=allow_config_change, init_from=init_from)
    universal = checkpoints.prepare_load(ckpt, layout, precision=cfg.train.precision)
    engine = build_engine(cfg, state, load_universal=universal, init_from=init_from, data_eos_id=data_eos_id)
    stream = build_train_stream(cfg, state)
    step, skipped, run_id = _resume(checkpoints, ckpt, engine, stream, universal=universal) if ckpt else (0, 0, None)
    tracker = build_tracker(cfg, run_dir, state, run_id=run_id)
    report = StepReporter(tracker, MetricsFile(run_dir / "metrics.jsonl", enabled=state.rank == 0, resume_step=step),
                          total_steps=cfg.train.steps, log_interval=cfg.train.log_interval, console=state.rank == 0)
    validation, tasks = Validation(cfg, state, engine), TaskEvaluation(cfg, state, engine, stream.tokenizer_spec)
    throughput = Throughput.of(cfg, layout.world_size, layout.global_batch_size)
    stop, losses, val_loss, last_ckpt, stopped_by, skips_in_a_row = StopRequest(), {}, None, None, StopReason.COMPLETED, 0

    def save(reason: str) -> Path | None:  # the newest good checkpoint
        return checkpoints.save(engine.engine, SavedState(
            step=step, data=stream.state_dict(), skipped_steps=skipped, mlflow_run_id=tracker.run_id, reason=reason,
            layout=dataclasses.asdict(layout), config=to_dict(cfg), non_finite_streak=skips_in_a_row,
            tokenizer=tokenizer_id)) or last_ckpt

    try:  # an exception still ends the MLflow run (FAILED) with its queued metrics sent
        batches = iter(stream)
        while step < cfg.train.steps:
            lr = engine.lr
            loss, seconds = train_step(engine, batches, layout.grad_accum_steps)
            step, skipped = step + 1, skipped + engine.last_step_skipped
            losses[step] = loss
            skips_in_a_row = skips_in_a_row + 1 if engine.last_step_skipped else 0
            metrics = step_metrics(loss=loss, lr=lr, seconds=seconds, grad_norm=engine.grad_norm, skipped_steps=skipped,
                                   stream=stream, throughput=throughput)
            if _every(cfg.train.eval_interval, step) and step < cfg.train.steps:
                val_loss = validation.run()
                metrics.update(validation_metrics(val_loss), **tasks.run(step))
            report(step, metrics, skipped=engine.last_step_skipped)
            reason = stop_reason(cfg, step, skips_in_a_row, stop, state.device,
                                 time_up=clock.time_up(seconds, checkpoints.last_save_seconds))
            if reason or step == cfg.train.steps or _every(cfg.checkpoint.interval, step):
                last_ckpt = save(reason or "interval")
            if reason:
                stopped_by = reason
                if reason is StopReason.NON_FINITE:
                    _log_non_finite_stop(skips_in_a_row, loss, last_ckpt)
                break
        if stopped_by is StopReason.COMPLETED:
            val_loss = _finish(cfg, run_dir, step, engine, state, validation, tasks, tracker, stream.tokenizer_spec)
    except BaseException:
        tracker.close("FAILED")
        raise
    finally:
        if lock is not None:
            lock.release()
    tracker.close("FAILED" if stopped_by is StopReason.NON_FINITE else "FINISHED")
    destroy_parallel()
    return TrainResult(step, losses, val_loss, stopped_by, last_ckpt, stop.signum if stopped_by is StopReason.SIGNAL else 0)


def train_step(engine: TrainEngine, batches: Iterator[torch.Tensor], grad_accum_steps: int) -> tuple[float, float]:
    """One optimizer step over this rank's next micro-batches: (global-batch mean loss, seconds)."""
    t0 = time.perf_counter()
    loss = engine.train_batch(micro_batches(batches, grad_accum_steps))
    return loss, time.perf_counter() - t0


def stop_reason(cfg: HippoConfig, step: int, skips_in_a_row: int, stop: StopRequest, device: torch.device, *,
                time_up: bool = False) -> StopReason | None:
    """Why the run stops after `step`, or None to go on. Collective (signals and clocks are agreed)."""
    if skips_in_a_row >= cfg.train.max_skipped_steps:
        return StopReason.NON_FINITE
    if agreed := stop.agreed(device, time_up=time_up and step < cfg.train.steps):
        return agreed
    if _every(cfg.train.exit_interval, step) and step < cfg.train.steps:
        return StopReason.EXIT_INTERVAL
    return None


def _starting_weights(cfg: HippoConfig, ckpt: Checkpoint | None, init_from: Path | None, tokenizer_id: str) -> Path | None:
    """The export to start from: none once the run has a checkpoint (resuming wins)."""
    if init_from is None:
        return None
    if ckpt is not None:
        if dist.get_rank() == 0:
            log.info("--init-from %s ignored: resuming %s, the run's own checkpoint", init_from, ckpt.path)
        return None
    check_init_from(cfg, Path(init_from), tokenizer_id)
    return Path(init_from)


def _log_non_finite_stop(steps: int, loss: float, checkpoint: Path | None) -> None:
    log.error("%d steps in a row had a non-finite loss or gradient norm (last loss %s); stopped. The newest good "
              "checkpoint is %s. Lower optim.lr or check the data.", steps, loss, checkpoint)


def _every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


def _resume(checkpoints: CheckpointManager, ckpt: Checkpoint, engine: TrainEngine, stream, *,
            universal: bool) -> tuple[int, int, str | None]:
    """Load `ckpt` into the engine and the stream: (step, skipped steps, MLflow run id to continue)."""
    t0 = time.perf_counter()
    saved = checkpoints.load(engine.engine, ckpt, world_size=dist.get_world_size(), universal=universal)
    seconds = time.perf_counter() - t0
    stream.load_state_dict(saved.data)
    # The same MLflow run continues only in its own run folder (its store); --resume from
    # another folder starts a new run.
    same_run = ckpt.folder.resolve() == checkpoints.folder.resolve()
    if checkpoints.rank == 0:
        log.info("resumed from %s at step %d (%d samples consumed); loaded in %.2f s", ckpt.path, saved.step,
                 stream.consumed_samples, seconds)
    return saved.step, saved.skipped_steps, saved.mlflow_run_id if same_run else None


def _finish(cfg: HippoConfig, run_dir: Path, step: int, engine: TrainEngine, state: ParallelState,
            validation: Validation, tasks: TaskEvaluation, tracker, tokenizer: str) -> float | None:
    """After the last step: the final validation, and the consolidated export: one shard per
    pipeline stage, written by that stage (no rank ever holds the whole model)."""
    val_loss = validation.run()
    tracker.log_metrics({**validation_metrics(val_loss), **tasks.run(step)}, step)
    if val_loss is not None:
        if state.rank == 0:
            m = validation_metrics(val_loss)
            log.info("validation after step %d: loss %.4f, perplexity %.2f", step, m["val_loss"], m["val_ppl"])
    params = stage_full_parameters(engine.module, state)  # TP shards gathered within the stage, on CPU
    writer = state.tp_rank == 0 and state.dp_rank == 0 and state.cp_rank == 0
    export, layout = run_dir / "export", state.layout
    if layout.pipeline == 1:
        if state.rank == 0:
            save_export(export, params, cfg.model, tokenizer=tokenizer, step=step)
        dist.barrier()
    else:
        save_export_by_stage(export, params if writer else None, stage=state.pp_rank, stages=layout.pipeline,
                             model_cfg=cfg.model, tokenizer=tokenizer, step=step)
    if state.rank == 0:
        tracker.set_tags({"export": str(export.resolve())})
        log.info("consolidated model for one process: %s", export)
    return val_loss


def _checked_layout(cfg: HippoConfig) -> tuple[ParallelLayout, str, int]:
    """The run's layout on this job's world size, and its data's tokenizer identity and EOS id, all
    checked before any process group exists."""
    if cfg.data is None:
        raise ConfigError("hippo train needs data.paths: prepared folders from `hippo data prepare`")
    _join_single_process_job()
    return cfg.layout(int(os.environ["WORLD_SIZE"])), *_check_data_fits_model(cfg)


def _join_single_process_job() -> None:
    """Let a plain `hippo train` (no launcher) join a one-rank job."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _claim_run_dir(run_dir: Path, state: ParallelState) -> RunLock | None:
    """Create the run folder and take its lock (rank 0); every rank fails if another trainer owns it."""
    lock, error = None, None
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError as e:
            error = str(e)
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RunLockedError(verdict[0])
    return lock


def _check_data_order(ckpt: Checkpoint | None) -> None:
    """Refuse, before anything is built, a checkpoint whose data stream follows another sample order."""
    if ckpt is None:
        return
    try:
        check_saved_order(ckpt.state.data)
    except ValueError as e:
        raise ConfigError(f"{ckpt.path}: {e}") from None


def _check_resumable(cfg: HippoConfig, ckpt: Checkpoint | None, tokenizer_id: str, *, allow_config_change: bool,
                     init_from: Path | None) -> Path | None:
    """Refuse, before anything is built, a checkpoint (or an export to start from) this config
    would misread; returns the export to start from, if any (none once there is a checkpoint)."""
    if ckpt is None:
        return _starting_weights(cfg, ckpt, init_from, tokenizer_id)
    if ckpt.state.tokenizer is not None and ckpt.state.tokenizer != tokenizer_id:
        raise ConfigError(f"{ckpt.path} was trained on data of tokenizer {ckpt.state.tokenizer}, data.paths "
                          f"{cfg.data.paths} are of tokenizer {tokenizer_id}: use data made with the run's tokenizer")
    never, flagged = resume_changes(ckpt.state.config, cfg)
    if never:
        raise ConfigError(f"the config differs from {ckpt.path}'s in what its weights mean: {'; '.join(never)}; "
                          f"start a new --run-dir instead")
    if flagged and not allow_config_change:
        raise ConfigError(f"the config differs from {ckpt.path}'s: {'; '.join(flagged)}; pass --allow-config-change "
                          f"to resume with these changes, or drop them")
    if flagged and dist.get_rank() == 0:
        log.warning("resuming %s with changed settings: %s", ckpt.path, "; ".join(flagged))
    return _starting_weights(cfg, ckpt, init_from, tokenizer_id)


def _check_data_fits_model(cfg: HippoConfig) -> tuple[str, int]:
    """The tokenizer identity and EOS id of the run's data, after checking the folders fit the model
    and share one tokenizer."""
    from hippo.data_pipeline.manifest import check_against_shards, load_manifest
    from hippo.data_pipeline.tokenizer import identity_label

    identities, eos_id = {}, None
    for path in cfg.data.paths:
        m = load_manifest(path)
        check_against_shards(path, m, cfg.data.split)
        if m.seq_len != cfg.train.seq_len or m.tokenizer["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(
                f"{path} holds windows for seq_len={m.seq_len} from a {m.tokenizer['vocab_size']}-token vocabulary; "
                f"set train.seq_len={m.seq_len} and model.vocab_size >= {m.tokenizer['vocab_size']}"
            )
        identities[path] = identity_label(m.tokenizer)
        eos_id = m.tokenizer["eos_id"]
        _take_eos_id(cfg, eos_id, path)
    if len(set(identities.values())) > 1:
        raise ConfigError(f"data.paths were made with different tokenizers: {identities}")
    return next(iter(identities.values())), eos_id


def _take_eos_id(cfg: HippoConfig, eos_id: int, path: str) -> None:
    """Under `model.document_isolation` the model must know the data's end-of-document token: taken
    from the data when unset (so checkpoints and the export record it), refused when it differs (as
    under `train.eod_mask_loss`, which reads it without writing it into the model config)."""
    m = cfg.model
    if not (m.document_isolation or cfg.train.eod_mask_loss):
        return
    if m.eos_id is None:
        if m.document_isolation:
            m.eos_id = eos_id
    elif m.eos_id != eos_id:
        raise ConfigError(f"model.eos_id={m.eos_id}, but {path} ends documents with token {eos_id}: "
                          f"set model.eos_id={eos_id} or leave it unset (taken from the data)")
