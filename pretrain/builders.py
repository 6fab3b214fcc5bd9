"""The parts of a training run, each built from the run config: engine, data, tracker, validation.

`hippo.parallel` takes the model config, the layout and an optimizer factory; the run config is
read only here, on the training side.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from itertools import islice
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from hippo.data_pipeline.errors import MissingSplitError
from hippo.data_pipeline.stream import build_stream
from hippo.data_pipeline.tokenizer import identity_label
from hippo.parallel.engine import TrainEngine, build_train_engine
from hippo.parallel.groups import ParallelState
from hippo.pretrain.config import ConfigError, HippoConfig, to_dict
from hippo.pretrain.models.config import RUNTIME_FIELDS
from hippo.pretrain.models.pretrained import read_config, weight_reader
from hippo.pretrain.optim import optimizer_factory
from hippo.pretrain.tracking import Tracker

log = logging.getLogger(__name__)

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


def build_engine(cfg: HippoConfig, state: ParallelState, *, load_universal: bool = False,
                 init_from: Path | None = None, data_eos_id: int | None = None) -> TrainEngine:
    """`init_from`: an export (`hippo export`, `hippo import h3`) whose weights the run starts from,
    with a fresh optimizer, in any parallel layout. `data_eos_id`: the data's end-of-document token
    (for `train.eod_mask_loss` where `model.eos_id` is unset)."""
    return build_train_engine(
        cfg.model, state, optimizer_factory(cfg.optim, cfg.train.steps), seed=cfg.train.seed,
        precision=cfg.train.precision, grad_clip=cfg.optim.grad_clip, load_universal=load_universal,
        initial_weights=None if init_from is None else weight_reader(init_from),
        eod_mask_id=eod_mask_id(cfg, data_eos_id),
        compile_seq_len=cfg.train.seq_len if cfg.train.compile_on(state.device.type) else None,
    )


def eod_mask_id(cfg: HippoConfig, data_eos_id: int | None = None) -> int | None:
    """The token whose positions `train.eod_mask_loss` leaves out of the loss (None when off):
    `model.eos_id`, else the data's. The model config is left as it is (it says what the weights
    mean; a loss option must not change it, or turning it on would be refused on resume)."""
    if not cfg.train.eod_mask_loss:
        return None
    eos = cfg.model.eos_id if cfg.model.eos_id is not None else data_eos_id
    if eos is None:
        raise ConfigError("train.eod_mask_loss=true needs the end-of-document token: set model.eos_id "
                          "(`hippo train` takes it from the data's tokenizer)")
    return eos


def check_init_from(cfg: HippoConfig, export: Path, tokenizer_id: str) -> None:
    """Refuse, before anything is built, an export of another architecture or tokenizer."""
    meta = read_config(export)
    theirs = {k: v for k, v in meta["model"].items() if k not in RUNTIME_FIELDS}
    ours = {k: v for k, v in to_dict(cfg.model).items() if k not in RUNTIME_FIELDS}
    if diff := [f"model.{k}: {theirs.get(k)!r} (export) vs {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
                if theirs.get(k) != ours.get(k)]:
        raise ConfigError(f"--init-from {export}: its model differs from the config's: {'; '.join(diff)}; set the "
                          f"model section to the export's ({export / 'config.json'})")
    info = meta.get("tokenizer_info") or {}
    theirs_tok = identity_label(info) if info.get("hash") else None
    if theirs_tok is not None and theirs_tok != tokenizer_id:
        raise ConfigError(f"--init-from {export} was trained with tokenizer {theirs_tok}, data.paths are of tokenizer "
                          f"{tokenizer_id}: prepare the data with the export's tokenizer ({export / 'tokenizer.json'})")


def build_train_stream(cfg: HippoConfig, state: ParallelState):
    layout = state.layout
    return build_stream(cfg.data, dp_rank=state.dp_rank, dp_size=layout.data,
                        micro_batch_size=layout.micro_batch_size, global_batch_size=layout.global_batch_size)


def micro_batches(batches: Iterator[torch.Tensor], count: int) -> MicroBatches:
    """The next `count` (input_ids, labels) pairs: samples hold seq_len + 1 tokens."""
    return [(b[:, :-1], b[:, 1:]) for b in islice(batches, count)]


def build_tracker(cfg: HippoConfig, run_dir: Path, state: ParallelState, *, run_id: str | None) -> Tracker:
    """MLflow on rank 0 (a no-op elsewhere). A new run logs the config, layout and versions."""
    t, rank0 = cfg.tracking, state.rank == 0
    tracker = Tracker(run_dir, enabled=rank0 and t.enabled, experiment=t.experiment, run_name=run_dir.name,
                      run_id=run_id, tracking_uri=t.tracking_uri, system_metrics=t.system_metrics)
    if run_id is None:
        layout = state.layout
        tracker.log_params({"config": to_dict(cfg), "layout": dataclasses.asdict(layout),
                            "world_size": layout.world_size, "versions": _versions()})
        if rank0:
            (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
            tracker.log_artifact(run_dir / "config.json")
    return tracker


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("hippo-pretrain", "torch", "deepspeed", "megatron-core", "webdataset", "mlflow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class Validation:
    """Mean loss over the first `train.eval_batches` global batches of the validation split."""

    def __init__(self, cfg: HippoConfig, state: ParallelState, engine: TrainEngine) -> None:
        layout = state.layout
        self.engine, self.grad_accum = engine, layout.grad_accum_steps
        try:
            self.stream = build_stream(
                dataclasses.replace(cfg.data, split="validation"), dp_rank=state.dp_rank, dp_size=layout.data,
                micro_batch_size=layout.micro_batch_size, global_batch_size=layout.global_batch_size,
                one_pass=True, max_batches=cfg.train.eval_batches)
        except MissingSplitError as e:
            if state.rank == 0:
                log.warning("no validation: %s (prepare with --val-fraction or --val-inputs)", e)
            self.stream = None

    def run(self) -> float | None:
        if self.stream is None:
            return None
        batches = iter(self.stream)
        losses = []
        while micro := micro_batches(batches, self.grad_accum):
            losses.append(self.engine.eval_batch(micro))
        return sum(losses) / len(losses)


class TaskEvaluation:
    """`train.eval_tasks` through lm-evaluation-harness: the weights gathered into one `HippoLM` on
    rank 0 (the other ranks hand in their shards and wait), its metrics returned there."""

    def __init__(self, cfg: HippoConfig, state: ParallelState, engine: TrainEngine, tokenizer_spec: str) -> None:
        self.cfg, self.state, self.engine = cfg, state, engine
        self.enabled = bool(cfg.train.eval_tasks)
        if self.enabled and state.rank == 0:
            from hippo.data_pipeline.tokenizer import load_tokenizer
            from hippo.pretrain.lm_eval_model import parse_tasks, task_manager

            task_manager(parse_tasks(cfg.train.eval_tasks), cfg.train.eval_tasks_include_path)  # unknown: fail now
            self.tokenizer = load_tokenizer(tokenizer_spec)

    def run(self, step: int) -> dict[str, float]:
        if not self.enabled:
            return {}
        from hippo.parallel.gather import gather_to_rank0

        params = gather_to_rank0(self.engine.module, self.state)
        metrics: dict[str, float] = {}
        if self.state.rank == 0:
            from hippo.pretrain.lm_eval_model import evaluate_tasks, task_metrics
            from hippo.pretrain.models import HippoLM

            model = HippoLM(self.cfg.model, init=False)
            model.load_state_dict(params, strict=False)
            t = self.cfg.train
            results = evaluate_tasks(model, self.tokenizer, t.eval_tasks, limit=t.eval_tasks_limit,
                                     include_path=t.eval_tasks_include_path, source=f"step {step}")
            metrics = {f"eval/{k}": v for k, v in task_metrics(results).items()}
            log.info("tasks after step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        dist.barrier()
        return metrics
