"""A run folder that survives damage and misuse: checksummed checkpoints, nothing non-finite saved as
good, resume refused under another architecture or tokenizer, one trainer per folder.

Every case starts from a copy of one trained base run (checkpoints at steps 8, 16 and 24) and
reproduces what once went wrong silently.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hippo.pretrain.checkpoint import MARKER, CheckpointManager
from hippo.pretrain.models.file_record import file_sha256
from hippo.pretrain.run_lock import LOCK_FILE, RunLock, RunLockedError
from tests.helpers import ROOT, STEPS, hippo_train, latest_step, losses, train_flags

pytestmark = pytest.mark.slow

OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
LAYER_FILE = "layer_01-model_00-model_states.pt"


@pytest.fixture(scope="module")
def base_run(train_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    hippo_train(run, train_data)
    assert sorted(int(p.name.removeprefix("global_step")) for p in (run / "checkpoints").glob("global_step*")) == [8, 16, 24]
    return run


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def flip_bytes(path: Path, count: int = 100) -> None:
    """Overwrite `count` bytes in the middle of the file: its size does not change."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(255 - b for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def rewrite_marker(ckpt: Path) -> None:
    """Record the checkpoint's current files in its marker, as a complete save would have."""
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"] = {rel: {"bytes": (ckpt / rel).stat().st_size, "sha256": file_sha256(ckpt / rel)}
                       for rel in marker["files"]}
    (ckpt / MARKER).write_text(json.dumps(marker))


def point_latest_at(run: Path, step: int) -> None:
    for later in (run / "checkpoints").glob("global_step*"):
        if int(later.name.removeprefix("global_step")) > step:
            shutil.rmtree(later)
    (run / "checkpoints" / "latest").write_text(f"global_step{step}")


def test_damaged_checkpoint_files_are_detected_and_the_run_falls_back(base_run, train_data, tmp_path):
    """Same-size damage (once loaded silently: first loss 5.38 instead of 2.99) in the model file
    of step 24 and the optimizer file of step 16: the run resumes from step 8, names both files,
    and trains steps 9-24 exactly as the base run did."""
    run = copy_run(base_run, tmp_path)
    flip_bytes(run / "checkpoints" / "global_step24" / LAYER_FILE)
    flip_bytes(run / "checkpoints" / "global_step16" / OPTIM_FILE)
    proc = hippo_train(run, train_data)
    assert f"global_step24: {LAYER_FILE} does not match its SHA-256" in proc.stderr
    assert f"global_step16: {OPTIM_FILE} does not match its SHA-256" in proc.stderr
    assert "resumed from" in proc.stderr and "global_step8 at step 8" in proc.stderr
    assert losses(run) == losses(base_run)


def set_exp_avg_sq_nan(obj) -> int:
    count = 0
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "exp_avg_sq" and torch.is_tensor(value):
                value.fill_(float("nan"))
                count += 1
            else:
                count += set_exp_avg_sq_nan(value)
    elif isinstance(obj, (list, tuple)):
        count += sum(set_exp_avg_sq_nan(v) for v in obj)
    return count


def test_non_finite_state_is_never_saved_and_good_checkpoints_are_never_pruned(base_run, train_data, tmp_path):
    """A checkpoint whose optimizer state holds NaN (checksums intact): its first update makes
    the weights NaN, every later step is skipped. Once, each interval then saved the NaN weights
    as "the last good state" and keep_last=2 deleted steps 8 and 16."""
    run = copy_run(base_run, tmp_path)
    point_latest_at(run, 16)
    ckpt = run / "checkpoints" / "global_step16"
    state = torch.load(ckpt / OPTIM_FILE, weights_only=False)
    assert set_exp_avg_sq_nan(state) > 0
    torch.save(state, ckpt / OPTIM_FILE)
    rewrite_marker(ckpt)
    proc = hippo_train(run, train_data, "train.steps=40", "checkpoint.interval=2", "checkpoint.keep_last=2",
                       "train.max_skipped_steps=3", "--allow-config-change", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not saving step 18: parameter" in proc.stderr and "is not finite" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("global_step*")) == ["global_step16", "global_step8"]
    assert latest_step(run) == 16
    for step in (8, 16):
        CheckpointManager.verify(run / "checkpoints" / f"global_step{step}")


def test_keep_last_counts_only_good_checkpoints(tmp_path):
    """Pruning after a save: a checkpoint written during a run of non-finite steps is kept but not
    counted, so the good ones before it survive."""
    folder = tmp_path / "checkpoints"
    for step, streak in ((8, 0), (16, 0), (24, 2), (32, 3)):
        ckpt = folder / f"global_step{step}"
        (ckpt / "hippo").mkdir(parents=True)
        (ckpt / "hippo" / "state.json").write_text(json.dumps({
            "step": step, "data": {}, "skipped_steps": streak, "layout": {}, "config": {}, "reason": "interval",
            "non_finite_streak": streak}))
        (ckpt / MARKER).write_text(json.dumps({"step": step, "files": {}}))
    CheckpointManager(folder, keep_last=1)._prune()
    assert sorted(p.name for p in folder.iterdir()) == ["global_step16", "global_step24", "global_step32"]


def test_resume_refuses_another_architecture_or_tokenizer_before_building(base_run, train_data, tmp_path):
    run = copy_run(base_run, tmp_path)
    config_before = (run / "config.json").read_text()

    t0 = time.monotonic()
    heads = hippo_train(run, train_data, "model.n_head=8", check=False)
    assert heads.returncode == 2 and "model.n_head: 4 -> 8" in heads.stderr, heads.stderr[-2000:]
    assert "Traceback" not in heads.stderr and time.monotonic() - t0 < 60
    width = hippo_train(run, train_data, "model.d_model=64", "--allow-config-change", check=False)
    assert width.returncode == 2 and "model.d_model: 32 -> 64" in width.stderr  # the flag cannot allow it

    steps = hippo_train(run, train_data, "train.steps=26", check=False)
    assert steps.returncode == 2 and "train.steps: 24 -> 26" in steps.stderr and "--allow-config-change" in steps.stderr
    assert (run / "config.json").read_text() == config_before and max(losses(run)) == STEPS

    state_file = run / "checkpoints" / "global_step24" / "hippo" / "state.json"
    state = json.loads(state_file.read_text())
    state["tokenizer"] = "bpe:0123456789abcdef"
    state_file.write_text(json.dumps(state))
    rewrite_marker(state_file.parents[1])
    other = hippo_train(run, train_data, check=False)
    assert other.returncode == 2 and "tokenizer bpe:0123456789abcdef" in other.stderr and "byte:" in other.stderr

    state["tokenizer"] = json.loads((run / "checkpoints" / "global_step16" / "hippo" / "state.json").read_text())["tokenizer"]
    state_file.write_text(json.dumps(state))
    rewrite_marker(state_file.parents[1])
    hippo_train(run, train_data, "train.steps=26", "--allow-config-change")
    assert max(losses(run)) == 26


def test_a_second_trainer_on_one_run_folder_is_refused_and_a_killed_owner_does_not_block(train_data, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "hippo.pretrain.cli", "train", "tiny_hybrid", "--run-dir", str(run),
            *train_flags(train_data, "train.steps=100000", "tracking.enabled=false")]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log_file = (tmp_path / "owner.log").open("w")
    owner = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert owner.poll() is None and time.monotonic() < deadline, (tmp_path / "owner.log").read_text()[-3000:]
            time.sleep(0.5)
        second = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        [line] = [line for line in second.stderr.splitlines() if line.startswith("hippo: error: ")]
        assert "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"in use by hippo train pid {owner.pid} on host {socket.gethostname()}" in line
        assert owner.poll() is None  # the owner is untouched
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        log_file.close()
    assert (run / LOCK_FILE).exists()  # a SIGKILL leaves the lock behind
    third = hippo_train(run, train_data, "train.steps=100000", "tracking.enabled=false", "train.exit_interval=8")
    assert "taking over the run folder's lock" in third.stderr
    assert not (run / LOCK_FILE).exists()


def test_a_lock_held_on_another_host_is_stale_only_without_heartbeat(tmp_path, monkeypatch):
    import threading

    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"host": "node-b", "pid": 1234, "job": "job-7", "started": time.time()}))
    with pytest.raises(RunLockedError, match="pid 1234 on host node-b"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "job-7")
    # The same job id with a live heartbeat (two jobs sharing an id) was once taken over at once.
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.05):
            os.utime(lock_file)

    threading.Thread(target=beat, daemon=True).start()
    try:
        with pytest.raises(RunLockedError, match="pid 1234 on host node-b"):
            RunLock(tmp_path, heartbeat_s=0.2).acquire()
    finally:
        beating.set()
    t0 = time.monotonic()  # its heartbeat stopped (a restart or requeue of this job): taken after two beats
    RunLock(tmp_path, heartbeat_s=0.2).acquire().release()
    assert time.monotonic() - t0 < 1.0
    monkeypatch.delenv("SLURM_JOB_ID")
    lock_file.write_text(json.dumps({"host": "node-b", "pid": 1234, "job": None, "started": time.time()}))
    old = time.time() - 600
    os.utime(lock_file, (old, old))  # no heartbeat for 10 minutes
    lock = RunLock(tmp_path).acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()

    lock_file.write_text(json.dumps({"host": "node-b", "pid": 1234, "job": "job-7", "started": time.time()}))
    monkeypatch.setenv("SLURM_JOB_ID", "job-7")
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")  # same host: the pid decides, never the job
    monkeypatch.setattr("hippo.pretrain.run_lock._pid_alive", lambda pid: True)
    with pytest.raises(RunLockedError, match="pid 1234 on host node-b"):
        RunLock(tmp_path, heartbeat_s=0.2).acquire()


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(train_data, tmp_path):
    """The run folder on a 2 MiB filesystem: step 8's checkpoint fits, step 16's does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk case is not tested")
    try:
        proc = hippo_train(disk / "run", train_data, "tracking.enabled=false", check=False)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("hippo: error:")]
        assert proc.returncode != 0 and len(lines) == 1 and f"no space left on {disk}" in lines[0], proc.stderr[-3000:]
        assert latest_step(disk / "run") == 8
        CheckpointManager.verify(disk / "run" / "checkpoints" / "global_step8")
        assert not (disk / "run" / "checkpoints" / "global_step16").exists()  # the part that fit is deleted
    finally:
        subprocess.run(["umount", str(disk)])


def test_ranks_wait_for_a_slow_universal_conversion_outside_any_collective(tmp_path, monkeypatch):
    """Rank 1's side of a layout change: rank 0 converts for longer than a collective may wait
    (simulated: the marker appears after 2 s); rank 1 waits on the file, entering no collective
    after the one before the conversion starts; a failed conversion reaches it as an error."""
    import threading

    import hippo.pretrain.checkpoint as ckpt_mod
    from hippo.parallel.layout import ParallelLayout
    from hippo.pretrain.checkpoint import Checkpoint, CheckpointError, SavedState

    collectives = []
    monkeypatch.setattr(ckpt_mod.dist, "barrier", lambda *a, **k: collectives.append(time.monotonic()))
    folder = tmp_path / "checkpoints"
    (folder / "global_step8").mkdir(parents=True)
    state = SavedState(step=8, data={}, skipped_steps=0, mlflow_run_id=None, config={}, reason="interval",
                       layout={"world_size": 1, "tensor": 1, "pipeline": 1, "data": 1})
    ckpt = Checkpoint(folder / "global_step8", state)
    new_layout = ParallelLayout(world_size=2, tensor=2, pipeline=1, data=1, micro_batch_size=1, grad_accum_steps=1)
    real_wait = ckpt_mod._wait_for
    monkeypatch.setattr(ckpt_mod, "_wait_for", lambda done, failed: real_wait(done, failed, poll_s=0.05))

    def convert_later() -> None:
        time.sleep(2)
        ckpt.universal_path.mkdir()
        (ckpt.universal_path / MARKER).write_text("{}")

    t0 = time.monotonic()
    threading.Thread(target=convert_later).start()
    assert CheckpointManager(folder, rank=1).prepare_load(ckpt, new_layout) is True
    assert time.monotonic() - t0 >= 2 and len(collectives) == 1 and collectives[0] - t0 < 1

    shutil.rmtree(ckpt.universal_path)
    (folder / f".{ckpt.universal_path.name}.failed").write_text("ds_to_universal: out of memory")
    monkeypatch.setattr(ckpt_mod.dist, "barrier", lambda *a, **k: None)  # rank 0 cleared nothing yet: the file stays
    with pytest.raises(CheckpointError, match="out of memory"):
        CheckpointManager(folder, rank=1).prepare_load(ckpt, new_layout)



def test_export_and_conversion_leave_no_marker_or_temporary_name_in_the_run(base_run, tmp_path, capsys):
    """`hippo export` once wrote global_step24_universal/ into the source run, and every conversion
    a `latest_universal` naming a temporary folder, which pruning left dangling: the export converts
    in its own scratch folder (deleted), a layout change's conversion beside its checkpoint."""
    from hippo.pretrain.cli import main

    run = copy_run(base_run, tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["export", str(run), "-o", str(tmp_path / "export")]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "hippo_files.json",
                                                                     "model.safetensors"]
    ckpt = CheckpointManager(run / "checkpoints").resolve()
    CheckpointManager.convert_to_universal(ckpt)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted([*before, "global_step24_universal"])


def test_a_full_disk_leaves_neither_a_torn_metrics_line_nor_an_empty_lock(tmp_path, monkeypatch):
    """Seen under the fault-injection test's full disk: a metrics line cut short made every later
    resume fail to parse metrics.jsonl, and a lock file created but not written blocked the folder
    as "unreadable holder" for 90 s."""
    import errno

    from hippo.pretrain.metrics import MetricsFile

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    MetricsFile(path, enabled=True, resume_step=2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hippo.pretrain.run_lock.json.dump", full)
    with pytest.raises(OSError):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_under_torchrun_a_refused_trainer_is_reported_once(train_data, tmp_path):
    """Each rank printed the refusal's traceback; now rank 0 prints one line for the job."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": None,
                                             "started": time.time()}))
    proc = hippo_train(run, train_data, nproc=2, check=False)
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.startswith("hippo: error:")]
    assert proc.returncode != 0 and len(lines) == 1, out[-4000:]
    assert f"in use by hippo train pid {os.getpid()}" in lines[0] and "RunLockedError" not in out
