"""Training checkpoints: DeepSpeed's sharded states plus Hippo's own, written atomically.

`CheckpointManager` owns the checkpoints folder of a run: resolve, save (the whole saved-state
schema), load, verify, keep-last and universal conversion. A checkpoint is the folder
`<run>/checkpoints/global_step<N>/` holding
  - DeepSpeed's files: model shards per TP/PP rank, optimizer shards per DP rank, scheduler;
  - `hippo/rank<r>.pt` per rank: every RNG (python, numpy, torch CPU/CUDA, the TP dropout streams);
  - `hippo/state.json`: step, data-loader state (consumed samples, seed, manifest hash), skipped
    steps, layout, MLflow run id and the resolved config;
  - `hippo_checkpoint.json`, written last by rank 0: every file of the checkpoint with its size.
`checkpoints/latest` names the newest complete checkpoint; it is replaced (atomic rename) only
after the marker exists. A crash while writing leaves `latest` on the previous checkpoint, and
loading verifies every listed file before trusting one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

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
    version: int = STATE_VERSION

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
                   reason=data.get("reason", "interval"), version=STATE_VERSION)


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
        return (saved["tensor"], saved["pipeline"], saved["data"]) == (layout.tensor, layout.pipeline, layout.data)


@dataclass
class CheckpointManager:
    """The checkpoints folder of one run, seen from one rank. `save`, `prepare_load` and `load`
    are collective: every rank calls them together."""

    folder: Path
    rank: int = 0
    keep_last: int = 3

    # ------------------------------------------------------------------ finding
    def resolve(self, resume: str | Path | None = None) -> Checkpoint | None:
        """`resume` (a global_stepN folder, a checkpoints folder or a run folder), else the newest
        checkpoint of this run that verifies (None for a new run)."""
        if resume is None:
            return self.latest(self.folder)
        path = Path(resume)
        if (path / MARKER).exists() or _TAG.match(path.name):
            return self.verify(path)
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        found = self.latest(path)
        if found is None:
            raise CheckpointError(f"{resume}: no complete checkpoint there")
        return found

    def latest(self, folder: Path) -> Checkpoint | None:
        """The checkpoint `latest` names; if it fails verification, the newest one that passes."""
        if not folder.exists():
            return None
        pointer = folder / LATEST
        if pointer.exists():
            try:
                return self.verify(folder / pointer.read_text().strip())
            except (CheckpointError, OSError, ValueError) as e:
                log.warning("checkpoint named by %s is not usable (%s); looking for an older one", pointer, e)
        for path in reversed(self._step_folders(folder)):
            try:
                return self.verify(path)
            except (CheckpointError, OSError, ValueError) as e:
                log.warning("skipping %s: %s", path, e)
        return None

    @staticmethod
    def verify(path: Path) -> Checkpoint:
        """Check that every file the marker lists exists with its recorded size."""
        marker = path / MARKER
        if not marker.exists():
            raise CheckpointError(f"{path} is incomplete: no {MARKER} (interrupted while writing?)")
        listing = json.loads(marker.read_text())
        for rel, size in listing["files"].items():
            f = path / rel
            if not f.exists():
                raise CheckpointError(f"{path}: {rel} is missing")
            if f.stat().st_size != size:
                raise CheckpointError(f"{path}: {rel} has {f.stat().st_size} bytes, the marker says {size}")
        state_file = path / "hippo" / "state.json"
        return Checkpoint(path, SavedState.from_json(json.loads(state_file.read_text()), state_file))

    # ------------------------------------------------------------------ writing
    def save(self, engine, state: SavedState) -> Path:
        """Write checkpoint `state.step` from every rank; returns its path."""
        path = self.folder / tag_for(state.step)
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if path.exists():  # a stale, incomplete attempt at this step
                shutil.rmtree(path)
        dist.barrier()
        engine.save_checkpoint(str(self.folder), tag=path.name, save_latest=False)
        (path / "hippo").mkdir(parents=True, exist_ok=True)
        _save_atomic(rng_state(), path / "hippo" / f"rank{self.rank}.pt")
        if self.rank == 0:
            _write_atomic(path / "hippo" / "state.json", json.dumps(asdict(state), indent=1))
        if os.environ.get(CRASH_BEFORE_MARKER_ENV) == str(state.step):  # fault injection for the crash test
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        if self.rank == 0:
            files = {
                str(f.relative_to(path)): f.stat().st_size
                for f in sorted(path.rglob("*"))
                if f.is_file() and not f.name.startswith(".")
            }
            _write_atomic(path / MARKER, json.dumps({"step": state.step, "files": files}, indent=1))
            _write_atomic(self.folder / LATEST, path.name)
            self._prune()
        dist.barrier()
        return path

    def _prune(self) -> None:
        for path in self._step_folders(self.folder)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.with_name(path.name + "_universal"), ignore_errors=True)

    def _step_folders(self, folder: Path) -> list[Path]:
        """global_stepN folders, oldest first."""
        tags = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _TAG.match(p.name)))
        return [p for _, p in tags]

    # ------------------------------------------------------------------ loading
    def prepare_load(self, ckpt: Checkpoint | None, layout) -> bool:
        """Whether `ckpt` loads through a universal checkpoint (another layout wrote it), converted
        here by rank 0 while the others wait."""
        universal = ckpt is not None and not ckpt.same_layout(layout)
        if universal and self.rank == 0:
            self.convert_to_universal(ckpt)
        dist.barrier()
        return universal

    def load(self, engine, ckpt: Checkpoint, *, world_size: int, universal: bool = False) -> SavedState:
        """Restore model, optimizer and scheduler (DeepSpeed) and this rank's RNG streams.

        `universal`: load the converted checkpoint into a different layout (the engine must have
        been built with `load_universal`)."""
        tag = ckpt.universal_path.name if universal else ckpt.tag
        load_path, _ = engine.load_checkpoint(str(ckpt.folder), tag=tag)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt.path}")
        rng_file = ckpt.path / "hippo" / f"rank{self.rank}.pt"
        if ckpt.state.layout["world_size"] == world_size and rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        elif self.rank == 0:
            log.info("world size changed (%s -> %d): RNG streams start fresh", ckpt.state.layout["world_size"], world_size)
        return ckpt.state

    @staticmethod
    def convert_to_universal(ckpt: Checkpoint) -> Path:
        """DeepSpeed's universal checkpoint (full fp32 tensors and moments per parameter) next to
        `ckpt`, so a run can continue with other TP, PP or DP sizes. One process; idempotent."""
        out = ckpt.universal_path
        if (out / MARKER).exists():
            return out
        tmp = ckpt.folder / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.path),
               "--output_folder", str(tmp), "--num_extract_workers", "2", "--num_merge_workers", "1"]
        log.info("converting %s to a universal checkpoint (new parallel layout)", ckpt.path)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            raise CheckpointError(f"converting {ckpt.path} to a universal checkpoint failed:\n{proc.stderr[-4000:]}")
        (tmp / MARKER).write_text(json.dumps({"source": ckpt.tag}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    @classmethod
    def universal_parameters(cls, ckpt: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
        """Full fp32 tensors of parameters `names` (DeepSpeed's names) from the universal form."""
        universal = cls.convert_to_universal(ckpt)
        params = {}
        for name in names:
            path = universal / "zero" / name / "fp32.pt"
            if not path.exists():
                raise CheckpointError(f"{path} missing: {universal} does not hold parameter {name}")
            params[name] = torch.load(path, weights_only=False)["param"]
        return params
