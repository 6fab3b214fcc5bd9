"""Training checkpoints: DeepSpeed's sharded states plus Hippo's own, written atomically.

`CheckpointManager` owns the checkpoints folder of a run: resolve, save (the whole saved-state
schema), load, verify, keep-last and universal conversion. A checkpoint is the folder
`<run>/checkpoints/global_step<N>/` holding
  - DeepSpeed's files: model shards per TP/PP rank, optimizer shards per DP rank, scheduler;
  - `hippo/rank<r>.pt` per rank: every RNG (python, numpy, torch CPU/CUDA, the TP dropout streams);
  - `hippo/state.json`: step, data-loader state (consumed samples, seed, manifest hash), skipped
    steps, layout, MLflow run id and the resolved config;
  - `hippo_checkpoint.json`, written last by rank 0: every file of the checkpoint with its size and
    SHA-256 (each rank hashes its share of the files).
`checkpoints/latest` names the newest complete checkpoint; it is replaced (atomic rename) only
after the marker exists. A crash while writing leaves `latest` on the previous checkpoint, and
loading verifies every listed file (size and checksum) before trusting one, falling back to the
newest checkpoint that verifies. A state with non-finite numbers is never written, and pruning
counts only good checkpoints (none written during a run of non-finite steps).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hippo.pretrain.models.file_record import file_entry, listing_problem

log = logging.getLogger(__name__)

MARKER = "hippo_checkpoint.json"
CRASH_BEFORE_MARKER_ENV = "HIPPO_FAULT_KILL_BEFORE_MARKER"
"""Tests set it to a step: every rank SIGKILLs itself with that checkpoint's shards written."""
LATEST = "latest"
STATE_VERSION = 1
"""Schema of `hippo/state.json`; checkpoints written before the key existed have version 1."""
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the path."""


def _no_space(error: BaseException, folder: Path) -> bool:
    """torch.save reports a full disk as a RuntimeError, not an OSError: check both ways."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        return "No space left" in str(error) or shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _wait_for(done: Path, failed: Path, poll_s: float = 1.0) -> None:
    """Until `done` exists (no timeout: the converting rank decides); `failed` holds its error."""
    while not done.exists():
        if failed.exists():
            raise CheckpointError(f"rank 0 could not convert the checkpoint: {failed.read_text()[-2000:]}")
        time.sleep(poll_s)


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    from hippo.parallel.runtime import import_deepspeed

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tensor_parallel": import_deepspeed().checkpointing.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from hippo.parallel.runtime import import_deepspeed

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    import_deepspeed().checkpointing.get_cuda_rng_tracker().set_states(state["tensor_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_deepspeed_checkpoint(engine, folder: Path, tag: str, what: Path) -> None:
    """`engine.load_checkpoint(folder, tag)`, through `deepspeed_compat.load_checkpoint` (which also
    restores the optimizer of bf16 without ZeRO, where DeepSpeed 0.19 does not)."""
    from hippo.parallel.deepspeed_compat import MissingOptimizerState, load_checkpoint

    try:
        loaded = load_checkpoint(engine, folder, tag)
    except MissingOptimizerState as e:
        raise CheckpointError(f"{what}: {e}") from e
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {what}")


@dataclass(frozen=True)
class SavedState:
    """`hippo/state.json`: everything a checkpoint holds besides DeepSpeed's and the RNG files."""

    step: int
    data: dict[str, Any]
    """The data stream's `state_dict()` (consumed samples, seed, manifest hash)."""
    skipped_steps: int
    mlflow_run_id: str | None
    layout: dict[str, Any]
    """The `ParallelLayout` it was written under (a different one loads through universal)."""
    config: dict[str, Any]
    """The resolved run config."""
    reason: str
    """Why it was written: 'interval', 'signal', 'exit interval' or 'non-finite'."""
    non_finite_streak: int = 0
    """Non-finite steps in a row when it was written: > 0 marks a state that is not trusted as
    good (it is kept, but `keep_last` counts only good checkpoints)."""
    tokenizer: str | None = None
    """Identity (hash) of the tokenizer its data was made with; None before the field existed."""
    version: int = STATE_VERSION

    @property
    def good(self) -> bool:
        return self.non_finite_streak == 0 and self.reason != "non-finite"

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> SavedState:
        version = data.get("version", 1)  # checkpoints before the field have the same schema
        if version > STATE_VERSION:
            raise CheckpointError(f"{path}: written by a newer Hippo (state version {version}); upgrade Hippo to load it")
        missing = sorted({"step", "data", "skipped_steps", "layout", "config"} - set(data))
        if missing:
            raise CheckpointError(f"{path}: state.json lacks {missing}")
        return cls(step=int(data["step"]), data=data["data"], skipped_steps=int(data["skipped_steps"]),
                   mlflow_run_id=data.get("mlflow_run_id"), layout=data["layout"], config=data["config"],
                   reason=data.get("reason", "interval"), non_finite_streak=int(data.get("non_finite_streak", 0)),
                   tokenizer=data.get("tokenizer"), version=STATE_VERSION)


@dataclass(frozen=True)
class Checkpoint:
    """A complete, verified checkpoint on disk."""

    path: Path
    state: SavedState

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def universal_path(self) -> Path:
        return self.folder / f"{self.tag}_universal"

    def same_layout(self, layout) -> bool:
        saved = self.state.layout
        # ZeRO's partitions are per replica (data x context): another CP size loads universally.
        return (saved["tensor"], saved["pipeline"], saved["data"], saved.get("context", 1)) == (
            layout.tensor, layout.pipeline, layout.data, layout.context)

    def move_problem(self, layout, precision: str) -> str | None:
        """Why this checkpoint cannot continue under `layout` at `precision` (one line naming the
        options that would load it), else None.

        An fp32 run at ZeRO stage 0 keeps its optimizer state where DeepSpeed 0.19 reads it only into
        the same engine: torch's AdamW state dict inside `mp_rank_*_model_states.pt`, no
        `*_optim_states.pt` files. So `ds_to_universal` cannot convert such a checkpoint ("can't find
        *_optim_states.pt files"), a ZeRO >= 1 engine looks for ZeRO files it lacks, and an fp32 ZeRO-0
        engine loads neither a universal checkpoint nor a ZeRO one (it reads `optimizer` from the model
        states: None there). bf16 at ZeRO-0 is DeepSpeed's BF16_Optimizer, which writes ZeRO files and
        moves (`deepspeed_compat` item 2). Checked before any conversion or engine is built."""
        saved = self.state.layout
        saved_stage = saved.get("zero_stage", 1)
        saved_precision = self.state.config.get("train", {}).get("precision", "fp32")
        fp32_zero0 = (saved_stage == 0 and saved_precision == "fp32") or (layout.zero_stage == 0 and precision == "fp32")
        if not fp32_zero0 or (self.same_layout(layout) and (saved_stage == 0) == (layout.zero_stage == 0)):
            return None
        return (f"{self.path} was written at parallel.zero_stage={saved_stage} ({saved_precision}) with tensor="
                f"{saved['tensor']}, pipeline={saved['pipeline']}, data={saved['data']}, context={saved.get('context', 1)}; "
                f"this run has parallel.zero_stage={layout.zero_stage} ({precision}) with tensor={layout.tensor}, pipeline="
                f"{layout.pipeline}, data={layout.data}, context={layout.context}: DeepSpeed cannot move fp32 ZeRO-0 "
                "optimizer state to another layout or ZeRO stage; resume with the checkpoint's parallel settings")


@dataclass
class CheckpointManager:
    """The checkpoints folder of one run, seen from one rank. `save`, `prepare_load` and `load`
    are collective: every rank calls them together."""

    folder: Path
    rank: int = 0
    keep_last: int = 3
    last_save_seconds: float = 0.0
    """How long the last save took (what a wall-clock limit must leave room for)."""

    # ------------------------------------------------------------------ finding
    def resolve(self, resume: str | Path | None = None) -> Checkpoint | None:
        """`resume` (a global_stepN folder, a checkpoints folder or a run folder), else the newest
        checkpoint of this run that verifies (None for a new run). Under a job every rank calls
        it: they verify the candidates' checksums together and agree on one."""
        candidates = self._candidates(Path(resume) if resume is not None else None)
        for path in candidates:
            try:
                t0 = time.perf_counter()
                ckpt = self._verified_by_all(path)
                if self.rank == 0:
                    log.info("verified %s (sizes and checksums) in %.2f s", path, time.perf_counter() - t0)
                return ckpt
            except CheckpointError as e:
                if resume is not None and len(candidates) == 1:
                    raise
                if self.rank == 0:
                    log.warning("not resuming from %s: %s; trying an older checkpoint", path, e)
        if resume is not None:
            raise CheckpointError(f"{resume}: no complete checkpoint there that verifies")
        return None

    def _candidates(self, resume: Path | None) -> list[Path]:
        """Checkpoints to try, newest first: the one `latest` names, then every global_stepN."""
        folder = self.folder if resume is None else resume
        if resume is not None and ((resume / MARKER).exists() or _TAG.match(resume.name)):
            return [resume]
        if resume is not None and (resume / "checkpoints").is_dir():
            folder = resume / "checkpoints"
        if not folder.is_dir():
            return []
        found = list(reversed(self._step_folders(folder)))
        pointer = folder / LATEST
        named = folder / pointer.read_text().strip() if pointer.exists() else None
        if named is not None and named in found:
            found.remove(named)
            found.insert(0, named)
        return found

    def _verified_by_all(self, path: Path) -> Checkpoint:
        """`verify` with the checksum work split over the job's ranks; fails on every rank if it
        fails on one, with that rank's reason."""
        part, parts = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        ckpt, error = None, None
        try:
            ckpt = self.verify(path, part=part, parts=parts)
        except (CheckpointError, OSError, ValueError) as e:
            error = str(e)
        if parts > 1:
            errors: list[str | None] = [None] * parts
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e), None)
        if error is not None:
            raise CheckpointError(error)
        return ckpt

    @staticmethod
    def verify(path: Path, *, part: int = 0, parts: int = 1) -> Checkpoint:
        """Every file the marker lists exists with its size and, for files part, part + parts, ...
        of the sorted listing, its SHA-256 (a same-size flip of bytes is caught too). Markers
        written before checksums existed list sizes only."""
        marker = path / MARKER
        if not marker.exists():
            raise CheckpointError(f"{path} is incomplete: no {MARKER} (interrupted while writing?)")
        if problem := listing_problem(path, json.loads(marker.read_text())["files"], part=part, parts=parts):
            raise CheckpointError(f"{path}: {problem}")
        state_file = path / "hippo" / "state.json"
        return Checkpoint(path, SavedState.from_json(json.loads(state_file.read_text()), state_file))

    # ------------------------------------------------------------------ writing
    def save(self, engine, state: SavedState) -> Path | None:
        """Write checkpoint `state.step` from every rank; returns its path, or None when the state
        holds non-finite numbers (nothing is written: it must never replace a good one)."""
        if bad := self._non_finite(engine):
            if self.rank == 0:
                log.error("not saving step %d: %s is not finite; the newest good checkpoint stays %s",
                          state.step, bad, self._latest_name())
            return None
        path, t0 = self.folder / tag_for(state.step), time.perf_counter()
        try:
            hash_seconds = self._write(engine, state, path)
        except (OSError, RuntimeError) as e:
            if _no_space(e, self.folder):
                shutil.rmtree(path, ignore_errors=True)  # the part that fit: give the disk its room back
                raise CheckpointError(f"no space left on {self.folder} while writing {path.name} (the partial "
                                      f"checkpoint is deleted); the previous checkpoint ({self._latest_name()}) is "
                                      "kept: free space and run again") from e
            raise
        self.last_save_seconds = time.perf_counter() - t0
        if self.rank == 0:
            log.info("checkpoint %s (%s) written in %.2f s, of which checksums %.2f s", path, state.reason,
                     self.last_save_seconds, hash_seconds)
        return path

    def _write(self, engine, state: SavedState, path: Path) -> float:
        """Returns the seconds this rank spent hashing."""
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a stale, incomplete attempt at this step
                shutil.rmtree(path)
        dist.barrier()
        from hippo.parallel.deepspeed_compat import bf16_zero0_client_state

        engine.save_checkpoint(str(self.folder), tag=path.name, save_latest=False,
                               client_state=bf16_zero0_client_state(engine))
        (path / "hippo").mkdir(parents=True, exist_ok=True)
        _save_atomic(rng_state(), path / "hippo" / f"rank{self.rank}.pt")
        if self.rank == 0:
            _write_atomic(path / "hippo" / "state.json", json.dumps(asdict(state), indent=1))
        if os.environ.get(CRASH_BEFORE_MARKER_ENV) == str(state.step):  # fault injection for the crash test
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        t0 = time.perf_counter()
        files = self._checksums(path)
        hash_seconds = time.perf_counter() - t0
        if self.rank == 0:
            _write_atomic(path / MARKER, json.dumps({"step": state.step, "files": files}, indent=1))
            _write_atomic(self.folder / LATEST, path.name)
            self._prune()
        dist.barrier()
        return hash_seconds

    def _checksums(self, path: Path) -> dict[str, dict[str, Any]]:
        """{file: {bytes, sha256}} of the whole checkpoint, each rank hashing its share of the
        files right after they are written (complete on rank 0)."""
        names = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        world, rank = dist.get_world_size(), dist.get_rank()
        mine = {n: file_entry(path / n) for n in names[rank::world]}
        parts: list[dict | None] = [None] * world
        dist.all_gather_object(parts, mine)
        return {n: part[n] for part in parts for n in part}

    def _non_finite(self, engine) -> str | None:
        """The first parameter or optimizer-state tensor of any rank holding a NaN or inf, or None."""
        bad = None
        for name, p in engine.module.named_parameters():
            if not torch.isfinite(p).all():
                bad = f"parameter {name}"
                break
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        if bad is None:
            for values in inner.state.values():
                if any(torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all() for t in values.values()):
                    bad = "optimizer state"
                    break
        found: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
        return next((b for b in found if b), None)

    def _latest_name(self) -> str:
        pointer = self.folder / LATEST
        return pointer.read_text().strip() if pointer.exists() else "none"

    def _prune(self) -> None:
        """Keep the newest `keep_last` good checkpoints and everything newer than the oldest of
        them (states written during a run of non-finite steps do not count); delete the rest."""
        folders = self._step_folders(self.folder)
        good = [p for p in folders if self._is_good(p)]
        if len(good) <= self.keep_last:
            return
        oldest_kept = good[-self.keep_last]
        for path in folders:
            if path == oldest_kept:
                break
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.with_name(path.name + "_universal"), ignore_errors=True)

    @staticmethod
    def _is_good(path: Path) -> bool:
        try:
            state = json.loads((path / "hippo" / "state.json").read_text())
            return (path / MARKER).exists() and SavedState.from_json(state, path).good
        except (OSError, ValueError, CheckpointError):
            return False

    def _step_folders(self, folder: Path) -> list[Path]:
        """global_stepN folders, oldest first."""
        tags = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _TAG.match(p.name)))
        return [p for _, p in tags]

    # ------------------------------------------------------------------ loading
    def prepare_load(self, ckpt: Checkpoint | None, layout, *, precision: str = "fp32") -> bool:
        """Whether `ckpt` loads through a universal checkpoint (another layout wrote it), converted
        here by rank 0. The other ranks wait for its marker file, not in a collective: converting a
        1B+ model can outlast NCCL's timeout (10 minutes), which a barrier would hit. A checkpoint
        that cannot move to `layout` at `precision` (`Checkpoint.move_problem`) is refused first."""
        if ckpt is not None and (problem := ckpt.move_problem(layout, precision)):
            raise CheckpointError(problem)
        universal = ckpt is not None and not ckpt.same_layout(layout)
        if not universal:
            return False
        failed = ckpt.folder / f".{ckpt.universal_path.name}.failed"
        if self.rank == 0:
            failed.unlink(missing_ok=True)
        dist.barrier()  # before the long part: nobody reads a failure left by an earlier attempt
        if self.rank == 0:
            try:
                self.convert_to_universal(ckpt)
            except BaseException as e:
                _write_atomic(failed, str(e))
                raise
        else:
            _wait_for(ckpt.universal_path / MARKER, failed)
        return True

    def load(self, engine, ckpt: Checkpoint, *, world_size: int, universal: bool = False) -> SavedState:
        """Restore model, optimizer and scheduler (DeepSpeed) and this rank's RNG streams.

        `universal`: load the converted checkpoint into a different layout (the engine must have
        been built with `load_universal`)."""
        tag = ckpt.universal_path.name if universal else ckpt.tag
        load_deepspeed_checkpoint(engine, ckpt.folder, tag, ckpt.path)
        rng_file = ckpt.path / "hippo" / f"rank{self.rank}.pt"
        if ckpt.state.layout["world_size"] == world_size and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif self.rank == 0:
            log.info("world size changed (%s -> %d): RNG streams start fresh", ckpt.state.layout["world_size"], world_size)
        return ckpt.state

    @staticmethod
    def convert_to_universal(ckpt: Checkpoint, out: Path | None = None) -> Path:
        """DeepSpeed's universal checkpoint (full fp32 tensors and moments per parameter), so a run
        can continue with other TP, PP or DP sizes: `out`, by default next to `ckpt` (where pruning
        deletes it with its checkpoint). One process; idempotent.

        The converter writes a `latest_universal` beside its output folder naming it, so it writes
        into a scratch folder of its own, which goes once the result is renamed into place: no
        marker of a temporary name is left where the checkpoints are."""
        out = ckpt.universal_path if out is None else Path(out)
        if (out / MARKER).exists():
            return out
        scratch = out.with_name(f".{out.name}.scratch")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        tmp = scratch / out.name
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.path),
               "--output_folder", str(tmp), "--num_extract_workers", "2", "--num_merge_workers", "1"]
        log.info("converting %s to a universal checkpoint (new parallel layout)", ckpt.path)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                raise CheckpointError(f"converting {ckpt.path} to a universal checkpoint failed:\n{proc.stderr[-4000:]}")
            (tmp / MARKER).write_text(json.dumps({"source": ckpt.tag}))
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return out

    @classmethod
    def universal_parameters(cls, ckpt: Checkpoint, names: list[str], scratch: Path) -> dict[str, torch.Tensor]:
        """Full fp32 tensors of parameters `names` (DeepSpeed's names) from the universal form: the
        one beside `ckpt` if a layout change made it, else one converted into `scratch` (the
        caller's folder: reading a run never writes into it)."""
        universal = ckpt.universal_path if (ckpt.universal_path / MARKER).exists() else cls.convert_to_universal(
            ckpt, Path(scratch) / ckpt.universal_path.name)
        params = {}
        for name in names:
            path = universal / "zero" / name / "fp32.pt"
            if not path.exists():
                raise CheckpointError(f"{path} missing: {universal} does not hold parameter {name}")
            params[name] = torch.load(path, weights_only=False)["param"]
        return params
