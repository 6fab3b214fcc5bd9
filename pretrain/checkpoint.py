"""Training checkpoints: DeepSpeed's sharded states plus Hippo's own, written atomically.

A checkpoint is the folder `<run>/checkpoints/global_step<N>/` holding
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
from dataclasses import dataclass
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
    from parallel.runtime import import_deepspeed

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
    from parallel.runtime import import_deepspeed

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    import_deepspeed().checkpointing.get_cuda_rng_tracker().set_states(state["tensor_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class Checkpoint:
    """A complete, verified checkpoint on disk."""

    path: Path
    step: int
    state: dict[str, Any]
    """Hippo's `state.json`."""

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name


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
    state = json.loads((path / "hippo" / "state.json").read_text())
    return Checkpoint(path, int(state["step"]), state)


def find_latest(folder: Path) -> Checkpoint | None:
    """The checkpoint `latest` names; if it fails verification, the newest one that passes."""
    if not folder.exists():
        return None
    pointer = folder / LATEST
    if pointer.exists():
        try:
            return verify(folder / pointer.read_text().strip())
        except (CheckpointError, OSError, ValueError) as e:
            log.warning("checkpoint named by %s is not usable (%s); looking for an older one", pointer, e)
    tags = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _TAG.match(p.name)))
    for _, path in reversed(tags):
        try:
            return verify(path)
        except (CheckpointError, OSError, ValueError) as e:
            log.warning("skipping %s: %s", path, e)
    return None


def resolve(resume: str | None, folder: Path) -> Checkpoint | None:
    """`--resume PATH` (a global_stepN folder, a checkpoints folder or a run folder), else the
    latest in `folder`."""
    if resume is None:
        return find_latest(folder)
    path = Path(resume)
    if (path / MARKER).exists() or _TAG.match(path.name):
        return verify(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    found = find_latest(path)
    if found is None:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint there")
    return found


def save(engine, folder: Path, step: int, state: dict[str, Any], *, keep_last: int, rank: int) -> Path:
    """Write checkpoint `step` from every rank; returns its path. Collective: all ranks call it."""
    tag = tag_for(step)
    path = folder / tag
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a stale, incomplete attempt at this step
            shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    (path / "hippo").mkdir(parents=True, exist_ok=True)
    _save_atomic(rng_state(), path / "hippo" / f"rank{rank}.pt")
    if rank == 0:
        _write_atomic(path / "hippo" / "state.json", json.dumps({**state, "step": step}, indent=1))
    if os.environ.get(CRASH_BEFORE_MARKER_ENV) == str(step):  # fault injection for the crash test
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if rank == 0:
        files = {
            str(f.relative_to(path)): f.stat().st_size
            for f in sorted(path.rglob("*"))
            if f.is_file() and not f.name.startswith(".")
        }
        _write_atomic(path / MARKER, json.dumps({"step": step, "files": files}, indent=1))
        _write_atomic(folder / LATEST, tag)
        _prune(folder, keep_last)
    dist.barrier()
    return path


def _prune(folder: Path, keep_last: int) -> None:
    tags = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _TAG.match(p.name)))
    for _, path in tags[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        universal = path.with_name(path.name + "_universal")
        shutil.rmtree(universal, ignore_errors=True)


def same_layout(ckpt: Checkpoint, layout) -> bool:
    saved = ckpt.state["layout"]
    return (saved["tensor"], saved["pipeline"], saved["data"]) == (layout.tensor, layout.pipeline, layout.data)


def universal_tag(ckpt: Checkpoint) -> str:
    return f"{ckpt.tag}_universal"


def convert_to_universal(ckpt: Checkpoint) -> Path:
    """DeepSpeed's universal checkpoint (full fp32 tensors and moments per parameter) next to
    `ckpt`, so a run can continue with other TP, PP or DP sizes. Rank 0 only; idempotent."""
    out = ckpt.folder / universal_tag(ckpt)
    done = out / MARKER
    if done.exists():
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


def load(engine, ckpt: Checkpoint, *, rank: int, world_size: int, universal: bool = False) -> None:
    """Restore model, optimizer and scheduler (DeepSpeed), and this rank's RNG streams.

    `universal`: load the converted checkpoint into a different layout (the engine must have
    been built with `checkpoint.load_universal`)."""
    tag = universal_tag(ckpt) if universal else ckpt.tag
    load_path, _ = engine.load_checkpoint(str(ckpt.folder), tag=tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt.path}")
    rng_file = ckpt.path / "hippo" / f"rank{rank}.pt"
    if ckpt.state["layout"]["world_size"] == world_size and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif rank == 0:
        log.info("world size changed (%s -> %d): RNG streams start fresh", ckpt.state["layout"]["world_size"], world_size)
