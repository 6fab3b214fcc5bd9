"""`hippo launch`: command lines and scripts (fast), and real launches on this machine (slow).

Every slow run trains the same tiny config on 2 ranks (data parallel 2) and is held to one
reference: a single-node torchrun with 2 processes, same config, uninterrupted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hippo.launch.deepspeed_launcher import deepspeed_command, parse_hostfile
from hippo.launch.env import train_argv
from hippo.launch.slurm import SlurmSpec, sbatch_script
from hippo.launch.torchrun import TorchrunSpec, torchrun_command
from hippo.pretrain.config import ConfigError
from hippo.pretrain.run_lock import LOCK_FILE
from tests.helpers import (ROOT, STEPS, free_port, latest_step, losses, output_within, processes_of, train_flags,
                           wait_for_steps)


# ------------------------------------------------------------------ fast: commands and scripts
def test_hostfile_errors_name_file_and_line(tmp_path):
    good = tmp_path / "hosts"
    good.write_text("# cluster\nnode-a slots=8\nnode-b slots=8  # second\n")
    assert parse_hostfile(good) == {"node-a": 8, "node-b": 8}
    for text, message in [("node-a slots=8\nnode-b 8\n", r"hosts:2: expected 'HOST slots=N'"),
                          ("node-a slots=0\n", r"hosts:1: slots must be >= 1"),
                          ("node-a slots=2\nnode-a slots=2\n", r"hosts:2: host 'node-a' listed twice"),
                          ("\n# nothing\n", r"lists no hosts")]:
        good.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_hostfile(good)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_hostfile(tmp_path / "missing")


def test_sbatch_script_for_two_nodes_of_eight_gpus():
    argv = train_argv("hybrid_1.3b", "/shared/runs/h13", ["train.global_batch_size=512"])
    spec = SlurmSpec(nodes=2, gpus_per_node=8, partition="gpu")
    script = sbatch_script(spec, argv, python="/venv/bin/python")
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --signal=TERM@120"]:
        assert line + "\n" in script
    # one torchrun agent per node via srun, c10d rendezvous on the first node of the allocation
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)" in script
    command = script.split('"${SRUN[@]}" ', 1)[1].replace("\\\n", " ").split()
    assert command == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--nnodes", '"$NNODES"', "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", '"$RDZV_ENDPOINT"', "--rdzv-id", '"$RDZV_ID"',
        "--max-restarts", "3", "--shutdown-timeout", str(spec.shutdown_timeout_s),
        "-m", "hippo.pretrain.cli", "train", "hybrid_1.3b", "--run-dir", "/shared/runs/h13",
        "--set", "train.global_batch_size=512",
    ]


def test_torchrun_and_deepspeed_command_lines(tmp_path):
    spec = TorchrunSpec(nnodes=2, nproc_per_node=4, rdzv_endpoint="10.0.0.1:29400", max_restarts=2)
    cmd = torchrun_command(spec, ["-m", "hippo.pretrain.cli", "train", "c.yaml"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend",
                   "c10d", "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "hippo-10-0-0-1-29400",
                   "--max-restarts", "2", "-m", "hippo.pretrain.cli", "train", "c.yaml"]
    with pytest.raises(ConfigError, match="HOST:PORT"):
        TorchrunSpec(nnodes=1, nproc_per_node=1, rdzv_endpoint="nohost")
    # The job id (TORCHELASTIC_RUN_ID, the run lock's job): once every job's was "hippo", so a second
    # job took a live first job's lock over as "the same job". One node: fresh per job, kept by the spec.
    one = TorchrunSpec(nnodes=1, nproc_per_node=2, rdzv_endpoint="127.0.0.1:29500")
    other = TorchrunSpec(nnodes=1, nproc_per_node=2, rdzv_endpoint="127.0.0.1:29500")
    assert one.rdzv_id.startswith("hippo-") and one.rdzv_id != other.rdzv_id
    assert torchrun_command(one, ["x"]) == torchrun_command(one, ["x"])
    assert TorchrunSpec(nnodes=2, nproc_per_node=1, rdzv_endpoint="h:1", rdzv_id="job-9").rdzv_id == "job-9"
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\nb slots=2\n")
    cmd = deepspeed_command(hosts, ["-m", "hippo.pretrain.cli", "train", "c.yaml"], no_ssh=True, node_rank=1,
                            master_addr="a", python="py")
    assert cmd[:3] == ["py", "-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--node_rank") + 1] == "1" and "--no_ssh" in cmd
    assert cmd[cmd.index("--module") + 1:] == ["hippo.pretrain.cli", "train", "c.yaml"]
    with pytest.raises(ConfigError, match="--node-rank"):
        deepspeed_command(hosts, ["-m", "x"], no_ssh=True)


def test_a_layout_the_world_cannot_run_is_refused_before_launching(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hippo.pretrain.cli", "launch", "torchrun", "--nproc-per-node", "3",
                           "tiny_hybrid", "--set", "parallel.tensor=2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "world size 3 is not divisible by parallel.tensor x parallel.pipeline x parallel.context = 2 x 1 x 1" in proc.stderr
    assert "hippo launch:" not in proc.stdout  # nothing was started


# ------------------------------------------------------------------ slow: real launches
def _launch(args: list[str], run: Path, data: Path, *overrides: str, env: dict | None = None,
            log=subprocess.PIPE) -> subprocess.Popen:
    """`hippo launch ARGS tiny_hybrid` with the test config (and `overrides`); its output to a pipe or
    the open file `log` (a long job would fill a pipe nobody reads)."""
    cmd = [sys.executable, "-m", "hippo.pretrain.cli", "launch", *args, "tiny_hybrid", "--run-dir", str(run),
           *train_flags(data, *overrides)]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The launcher's output once it exits 0; a launcher still running after `timeout` is killed
    with its workers (a rendezvous that never completes must fail the test, not hang CI)."""
    out = output_within(proc, timeout, "launcher")
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def single_node(train_data, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("single_node")
    out = _finish(_launch(["torchrun", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"], run, train_data))
    assert out.startswith("hippo launch: ") and "torch.distributed.run" in out.splitlines()[0]
    return losses(run)


@pytest.mark.slow
def test_two_torchrun_agents_on_one_machine_equal_one_node(train_data, single_node, tmp_path):
    """Two 'nodes' (two torchrun agents, one process each) meet at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    agents = [_launch(args, tmp_path / "run", train_data) for _ in range(2)]
    for agent in agents:
        _finish(agent)
    assert latest_step(tmp_path / "run") == STEPS
    assert losses(tmp_path / "run") == pytest.approx(single_node, rel=1e-6)


def torchrun_args(*extra: str) -> list[str]:
    return ["torchrun", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *extra]


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The worker of `rank` among the launcher's descendants (None between restarts)."""
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "hippo.pretrain.cli" in p.cmdline() and p.environ().get("RANK") == str(rank):
                return p
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_resumes_from_the_latest_checkpoint(train_data, single_node, tmp_path):
    """Rank 0, the holder of the run lock, is killed: the restart (same job) takes the lock over
    at once, since its holder is gone."""
    run = tmp_path / "run"
    agent = _launch(torchrun_args("--max-restarts", "1"), run, train_data)
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and agent.poll() is None and killed is None:
        metrics = run / "metrics.jsonl"
        if (run / "checkpoints" / "latest").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            if killed := rank_process(agent, 0):
                killed.send_signal(signal.SIGKILL)
        time.sleep(0.05)
    out = _finish(agent)
    assert killed is not None, "the run ended before a worker could be killed"
    assert "resumed from" in out and "taking over the run folder's lock from pid" in out
    assert losses(run) == single_node  # every step, including those redone after the restart


@pytest.mark.slow
def test_a_second_launch_on_a_run_folder_in_use_is_refused_in_one_line(train_data, single_node, tmp_path):
    """Every job's torchrun id was "hippo", so a second job's rank 0 took the live first job's lock
    over as "the same job" and both trained (583 metrics rows for 300 steps)."""
    run = tmp_path / "run"
    first = _launch(torchrun_args(), run, train_data)
    wait_for_steps(run, 2, first)
    second = _launch(torchrun_args(), run, train_data)
    out = output_within(second, 120, "second launcher")
    [line] = out.splitlines()
    assert second.returncode == 1, out
    assert line.startswith(f"hippo: error: run folder {run} is in use by hippo train pid {rank_process(first, 0).pid}")
    _finish(first)
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1)) and losses(run) == single_node


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigterm_to_the_launcher_checkpoints_stops_the_job_and_the_resume_is_bitwise(train_data, single_node,
                                                                                     tmp_path, launcher):
    """SIGTERM to `hippo launch torchrun` once left torchrun and its ranks training (to step 300,
    11 minutes later) with no signal checkpoint; it is passed on now, and waited for."""
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")

    def args() -> list[str]:
        return (torchrun_args() if launcher == "torchrun" else
                ["deepspeed", "--hostfile", str(hostfile), "--master-port", str(free_port())])

    job = _launch(args(), run, train_data)
    wait_for_steps(run, 3, job)
    job.send_signal(signal.SIGTERM)
    out = output_within(job, 120, "launcher")
    assert job.returncode == 128 + signal.SIGTERM, out[-6000:]
    assert "hippo launch: passing SIGTERM to the job" in out and "received SIGTERM" in out
    stopped = latest_step(run)
    state = json.loads((run / "checkpoints" / f"global_step{stopped}" / "hippo" / "state.json").read_text())
    assert 3 <= stopped < STEPS and state["reason"] == "signal", out[-6000:]
    assert not processes_of(run) and not (run / LOCK_FILE).exists()
    _finish(_launch(args(), run, train_data))
    if launcher == "torchrun":
        assert losses(run) == single_node
    else:  # the DeepSpeed launcher's runs differ from torchrun's in the last bits from step 1 on
        assert losses(run) == pytest.approx(single_node, rel=1e-6)


@pytest.mark.slow
def test_sbatch_script_runs_locally_as_one_node(train_data, single_node, tmp_path):
    script = tmp_path / "job.sbatch"
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "hippo.pretrain.cli", "launch", "slurm", "--nodes", "1", "--gpus-per-node", "2",
                    "--script", str(script), "tiny_hybrid", "--run-dir", str(run), *train_flags(train_data)], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    port = free_port()
    script.write_text(script.read_text().replace(":29500", f":{port}"))  # a free port on this machine
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLURM_NNODES="1", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="42",
               PATH="/usr/bin:/bin", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # no srun, no scontrol
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert losses(run) == pytest.approx(single_node, rel=1e-6)


@pytest.mark.slow
def test_deepspeed_launcher_with_a_localhost_hostfile(train_data, single_node, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    out = _finish(_launch(["deepspeed", "--hostfile", str(hostfile), "--master-port", str(free_port())], run, train_data))
    notice, command = out.splitlines()[:2]
    assert notice.startswith("hippo launch: forwarding") and ".hippo_deepspeed_env" in notice
    assert "deepspeed.launcher.runner" in command
    assert losses(run) == pytest.approx(single_node, rel=1e-6)


@pytest.fixture
def two_network_namespaces():
    """Two 'hosts' with their own addresses (10.77.0.1 and .2) joined by a veth pair, or a skip."""
    names, ns = [f"hippo{os.getpid()}a", f"hippo{os.getpid()}b"], []
    veth = [f"hv{os.getpid()}a", f"hv{os.getpid()}b"]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for name in names:
            ip("netns", "add", name)
            ns.append(name)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i, (name, dev) in enumerate(zip(names, veth)):
            ip("link", "set", dev, "netns", name)
            ip("-n", name, "addr", "add", f"10.77.0.{i + 1}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
            ip("-n", name, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        for name in ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {getattr(e, 'stderr', e)}")
    yield list(zip(names, veth, ["10.77.0.1", "10.77.0.2"]))
    for name in ns:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.slow
def test_two_nodes_in_network_namespaces_over_a_veth_pair(train_data, single_node, tmp_path, two_network_namespaces):
    """Two hosts with their own addresses: rendezvous and gloo traffic cross the veth pair."""
    port = 29400
    agents = []
    for i, (name, dev, addr) in enumerate(two_network_namespaces):
        cmd = ["ip", "netns", "exec", name, sys.executable, "-m", "hippo.pretrain.cli", "launch", "torchrun",
               "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"10.77.0.1:{port}",
               "--local-addr", addr, *(["--rdzv-host"] if i == 0 else []), "tiny_hybrid", "--run-dir", str(tmp_path / "run"), *train_flags(train_data)]
        env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME=dev)
        agents.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True))
    try:
        for agent in agents:
            _finish(agent, timeout=240)
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    assert losses(tmp_path / "run") == pytest.approx(single_node, rel=1e-6)


# ------------------------------------------------------------------ slow: faults at random steps
FAULT_SEED = 23
KILL_WORKER, STOP_AGENT, FILL_DISK = "SIGKILL to a worker", "SIGTERM to the torchrun agent", "a full disk"


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs to fill, or None where this machine cannot mount one (no root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        yield None
        return
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def _last_step(run: Path, since: float = 0.0) -> int:
    """The newest step in metrics.jsonl (0 before the first; a torn last line is skipped); 0 while
    the file is unchanged since `since` (a job restarted after a fault rewrites it on resume)."""
    steps = [0]
    if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_mtime > since:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                steps.append(json.loads(line)["step"])
    return max(steps)


def _wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "a fault was not taken in"
        time.sleep(0.05)


def _fill(f, disk: Path, leave: int = 16 * 1024) -> None:
    """Fill `disk` to its last `leave` bytes through the open file f. The job writes to the same
    disk meanwhile (checkpoints, metrics), so the free space read a moment ago may be gone: an
    allocation that no longer fits is retried against the new free space (it failed whole)."""
    for _ in range(20):
        free = shutil.disk_usage(disk).free - leave
        if free <= 0:
            return
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size + free)
            return
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    raise AssertionError(f"could not fill {disk}: the job kept writing")


def _inject(kind: str, job: subprocess.Popen, disk: Path | None, rng: random.Random) -> None:
    """Cause the fault and return once the job has taken it in (a dead worker gone, a full disk
    failed a write: the job restarted its workers or ended)."""
    if kind == STOP_AGENT:
        [agent] = [c for c in psutil.Process(job.pid).children() if "torch.distributed.run" in c.cmdline()]
        agent.send_signal(signal.SIGTERM)
        return
    _wait_until(lambda: rank_process(job, 0) is not None and rank_process(job, 1) is not None)
    before = rank_process(job, 0).pid
    if kind == KILL_WORKER:
        victim = rank_process(job, rng.randrange(2))
        victim.kill()
        victim.wait(60)
        return
    filler = disk / "filler"
    with open(filler, "wb") as f:
        _fill(f, disk)
    try:
        _wait_until(lambda: job.poll() is not None or getattr(rank_process(job, 0), "pid", before) != before, 300)
    finally:
        filler.unlink()


@pytest.mark.slow
def test_faults_at_seeded_random_steps_lose_no_step_and_change_no_loss(train_data, single_node, small_disk, tmp_path):
    """A 2-rank `hippo launch torchrun` job takes, at steps a seed draws, a SIGKILL to one of its
    workers (torchrun restarts them), a SIGTERM to its agent (a signal checkpoint; the job ends and
    is launched again) and a disk filled to the last 16 KiB (a failed write; the space is freed and
    the job restarts); at the end metrics.jsonl holds every step once, every loss equals the
    uninterrupted run's bit for bit, and no process of the job is left."""
    rng = random.Random(FAULT_SEED)
    kinds = [KILL_WORKER, STOP_AGENT] + ([FILL_DISK] if small_disk else [])
    plan = sorted((rng.randint(3, STEPS - 4), kind) for kind in rng.sample(kinds, len(kinds)))
    run = (small_disk or tmp_path) / "run"
    log = (tmp_path / "job.log").open("w")
    print(f"job log: {tmp_path / 'job.log'}")
    launches, survived, t0, last_fault = 1, [], time.monotonic(), 0.0

    def launch() -> subprocess.Popen:
        return _launch(torchrun_args("--max-restarts", "1"), run, train_data, "tracking.enabled=false", log=log)

    job = launch()
    try:
        while job.poll() is None or job.returncode != 0:
            if job.poll() is not None:  # ended by a fault: nothing of it may be left, then launch again
                assert not processes_of(run) and launches < 2 * len(kinds) + 2, (tmp_path / "job.log").read_text()[-6000:]
                job, launches = launch(), launches + 1
            elif plan and _last_step(run, since=last_fault) >= plan[0][0]:
                step, kind = plan.pop(0)
                _inject(kind, job, small_disk, rng)
                survived.append(f"{kind} at step {step}")
                last_fault = time.time()
            assert time.monotonic() - t0 < 900, (tmp_path / "job.log").read_text()[-6000:]
            time.sleep(0.05)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        log.close()
    print(f"faults survived ({time.monotonic() - t0:.0f} s, {launches} launches): {'; '.join(survived)}")
    assert len(survived) == len(kinds), survived
    out = (tmp_path / "job.log").read_text()
    felt = {KILL_WORKER: "failed (exitcode: -9)", STOP_AGENT: "received sigterm", FILL_DISK: "no space left"}
    missing = [kind for kind in kinds if felt[kind] not in out.lower()]
    assert not missing and out.count("resumed from") >= len(kinds), (missing, out.count("resumed from"))
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1))
    assert losses(run) == single_node
    assert not processes_of(run)
