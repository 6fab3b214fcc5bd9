"""Helpers shared by test folders: running Hippo under a launcher, and the tiny training runs."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from hippo.pretrain.checkpoint import LATEST

ROOT = Path(__file__).resolve().parents[1]

STEPS = 24
BASE = [
    "model.vocab_size=257", "model.d_model=32", "model.n_layer=4", "model.n_head=4", "model.attn_layer_idx=[1]",
    f"train.steps={STEPS}", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.eval_interval=8", "train.eval_batches=2", "checkpoint.interval=8", "optim.lr=0.003",
    "tracking.system_metrics=false", "checkpoint.keep_last=3",
]


# Single-process runs train with dropout, so their bitwise resume also proves every RNG stream
# (default and tensor-parallel) is restored. Runs that change layout cannot restore per-rank
# streams, so the parallel runs keep dropout off.
DROPOUT = "model.dropout=0.1"


def text_document(rng: random.Random) -> str:
    words = ["state", "space", "hippo", "shift", "diagonal", "kernel", "token", "model"]
    return " ".join(f"{rng.choice(words)}{rng.randint(0, 9)}" for _ in range(rng.randint(5, 60)))


def train_flags(data: Path, *overrides: str) -> list[str]:
    """The test config as command-line flags: `key=value`s become `--set`s, others (`--resume X`)
    pass through."""
    flags = []
    for o in (*BASE, f"data.paths=[{data}]", *overrides):
        flags += ["--set", o] if "=" in o and not o.startswith("--") else [o]
    return flags


def hippo_train(run_dir: Path, data: Path, *overrides: str, nproc: int = 0, env: dict | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
    """`hippo train` with the test config and `overrides`."""
    argv = ["-m", "hippo.pretrain.cli", "train", "tiny_hybrid", "--run-dir", str(run_dir), *train_flags(data, *overrides)]
    return torchrun(nproc, argv, env=env, check=check)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / LATEST).read_text().strip().removeprefix("global_step"))


def torchrun(nproc: int, argv: list[str], *, timeout: float = 600, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `argv` (a script and its arguments, or -m module ...) on `nproc` local ranks (gloo on
    CPU); nproc 0 runs it as a plain process, without a launcher. Raises with its output if it fails."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())] if nproc else []
    cmd = [sys.executable, *launcher, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def output_within(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The output of `proc` (its own process group) once it exits; still running after `timeout`, it
    is killed with its children and the test fails (a stuck rendezvous must not hang CI)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{what} still running after {timeout} s:\n{out[-6000:]}") from None
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(run_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names `run_dir`: a job's launcher, agents and ranks."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(run_dir) in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `metrics.jsonl` of `run_dir` holds `steps` rows (the job must still run)."""
    import time

    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, f"the job ended before step {steps}"
        assert time.monotonic() < deadline, f"no step {steps} after {timeout} s"
        time.sleep(0.05)
