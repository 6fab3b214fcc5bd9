"""Launching from a login node: what reaches the job, the early stop signal, the README's commands.

The launching host here has no GPU, like a login node. sbatch (fake, on the PATH) and pdsh/ssh
(fake) record what they are given instead of running it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hippo.launch.env import HOST_DECIDED
from hippo.launch.slurm import SlurmSpec, sbatch_script
from tests.helpers import ROOT, STEPS, free_port, latest_step, output_within, train_flags

LOGIN_NODE_SETTINGS = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
"""What a CPU-only host's shell may hold (this project's CPU tests export exactly these)."""

RECORDER = """#!{python}
import json, os, sys
from pathlib import Path
out = Path(os.environ["HIPPO_FAKE_OUT"])
calls = out / "calls.jsonl"
with calls.open("a") as f:
    f.write(json.dumps({{"argv": sys.argv, "env": dict(os.environ)}}) + "\\n")
if Path(sys.argv[0]).name == "sbatch":
    (out / "submitted.sbatch").write_text(Path(sys.argv[1]).read_text())
    print("Submitted batch job 1")
if sys.argv[1:] and sys.argv[-1] == "-I":  # ssh HOST hostname -I: the address DeepSpeed asks for
    print("10.0.0.1")
"""


def _fake_tools(tmp_path: Path, *names: str) -> dict[str, str]:
    """A login node's environment with `names` on the PATH as recorders of their calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        tool = bin_dir / name
        tool.write_text(RECORDER.format(python=sys.executable))
        tool.chmod(0o755)
    return dict(os.environ, **LOGIN_NODE_SETTINGS, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                HIPPO_FAKE_OUT=str(tmp_path))


def _calls(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _hippo_launch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hippo.pretrain.cli", "launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ what reaches the job
def test_slurm_submit_leaves_the_login_nodes_settings_behind(tmp_path):
    """sbatch hands its environment to every node of the job: the host-decided settings are not in it,
    and the script exports none of them either."""
    env = _fake_tools(tmp_path, "sbatch")
    proc = _hippo_launch(["slurm", "--nodes", "1", "--gpus-per-node", "8", "--script", "job.sbatch", "--submit",
                          "hybrid_1.3b", "--set", "data.paths=[/shared/pile]"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [call] = _calls(tmp_path)
    assert call["argv"][1:] == ["job.sbatch"]
    assert not set(HOST_DECIDED) & set(call["env"]), {k: call["env"][k] for k in HOST_DECIDED if k in call["env"]}
    assert call["env"]["PYTHONPATH"] == str(ROOT)  # the rest of the environment goes with the job
    script = (tmp_path / "submitted.sbatch").read_text()
    assert not any(name in script for name in HOST_DECIDED)


def test_deepspeed_over_ssh_exports_none_of_the_login_nodes_settings(tmp_path):
    """The DeepSpeed launcher (real, on this GPU-less host) ships its exports in pdsh's remote command."""
    env = _fake_tools(tmp_path, "pdsh", "ssh")
    (tmp_path / "hosts.txt").write_text("node-a slots=4\nnode-b slots=4\n")
    proc = _hippo_launch(["deepspeed", "--hostfile", "hosts.txt", "hybrid_1.3b", "--set", "data.paths=[/shared/pile]"],
                         env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [pdsh] = [c for c in _calls(tmp_path) if Path(c["argv"][0]).name == "pdsh"]
    remote = " ".join(pdsh["argv"][pdsh["argv"].index("-w") + 2:])
    exports = re.findall(r"export (\w+)=", remote)
    assert "PYTHONPATH" in exports and "deepspeed.launcher.launch" in remote and "hippo.pretrain.cli train" in remote
    assert not set(HOST_DECIDED) & set(exports), exports


def test_deepspeed_over_ssh_carries_the_nccl_settings_from_a_gpu_less_login_node(tmp_path):
    """DeepSpeed forwards NCCL_* only when the launching host has CUDA: from this GPU-less host the
    job's network settings (and torch's NCCL error handling) would not reach the nodes."""
    env = _fake_tools(tmp_path, "pdsh", "ssh")
    env.update(NCCL_SOCKET_IFNAME="ib0", NCCL_IB_HCA="mlx5_0,mlx5_1", TORCH_NCCL_BLOCKING_WAIT="0")
    (tmp_path / "hosts.txt").write_text("node-a slots=4\nnode-b slots=4\n")
    proc = _hippo_launch(["deepspeed", "--hostfile", "hosts.txt", "hybrid_1.3b", "--run-dir", str(tmp_path / "run"),
                          "--set", "data.paths=[/shared/pile]"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [pdsh] = [c for c in _calls(tmp_path) if Path(c["argv"][0]).name == "pdsh"]
    remote = " ".join(pdsh["argv"][pdsh["argv"].index("-w") + 2:])
    exports = dict(re.findall(r"export (\w+)=([^;]*);", remote))
    assert exports["NCCL_SOCKET_IFNAME"] == "ib0" and exports["NCCL_IB_HCA"].strip('"') == "mlx5_0,mlx5_1"
    assert exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and exports["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert not set(HOST_DECIDED) & set(exports), exports


# ------------------------------------------------------------------ the early stop signal
def _torchrun_grace_default() -> int:
    """Seconds torchrun gives its workers after a SIGTERM before SIGKILL, unless told otherwise."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout


def _signal_and_grace(script: str) -> tuple[int, int]:
    lead = int(re.search(r"^#SBATCH --signal=TERM@(\d+)$", script, re.M).group(1))  # no B:, the steps' tasks
    grace = re.search(r"--shutdown-timeout (\d+)", script)
    return lead, int(grace.group(1)) if grace else _torchrun_grace_default()


def test_the_sbatch_script_gives_the_workers_most_of_the_signal_lead_to_checkpoint(monkeypatch):
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    for lead in (120, 300):
        script = sbatch_script(SlurmSpec(nodes=2, gpus_per_node=8, signal_lead_s=lead), ["-m", "hippo.pretrain.cli"])
        got_lead, grace = _signal_and_grace(script)
        assert got_lead == lead and _torchrun_grace_default() < grace < lead


SLOW_STOP_WORKER = """
import signal, sys, time
from pathlib import Path
out, linger = Path(sys.argv[1]), float(sys.argv[2])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(time.monotonic()))
(out / "ready").write_text("")
while not stop:
    time.sleep(0.05)
time.sleep(linger)  # a checkpoint that takes longer than torchrun's default grace
(out / "stopped_cleanly").write_text(f"{time.monotonic() - stop[0]:.1f}")
"""


def _run_local_job(script: str, path: Path, **extra_env: str) -> subprocess.Popen:
    """The sbatch script on this machine as SLURM would start it on one node (no srun: the batch
    shell runs the torchrun agent itself)."""
    job = path / "job.sbatch"
    job.write_text(script.replace(":29500", f":{free_port()}"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLURM_NNODES="1", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID="42",
               PATH="/usr/bin:/bin", **extra_env)
    for name in HOST_DECIDED:
        env.pop(name, None)  # the worker decides them
    return subprocess.Popen(["bash", str(job)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _signal_the_step(job: subprocess.Popen, ready, timeout: float = 300) -> None:
    """What slurmstepd does at the `--signal` time: SIGTERM to the step's task, the torchrun agent."""
    deadline = time.time() + timeout
    while not ready():
        assert job.poll() is None and time.time() < deadline, "the job ended before it could be signalled"
        time.sleep(0.02)
    [agent] = [p for p in psutil.Process(job.pid).children() if "torch.distributed.run" in " ".join(p.cmdline())]
    agent.send_signal(signal.SIGTERM)


def _wait(job: subprocess.Popen, timeout: float = 300) -> str:
    return output_within(job, timeout, "job")


@pytest.mark.dist
def test_the_early_signal_gives_a_worker_longer_than_torchruns_default_grace(tmp_path):
    linger = _torchrun_grace_default() + 5
    worker = tmp_path / "slow_stop_worker.py"
    worker.write_text(SLOW_STOP_WORKER)
    script = sbatch_script(SlurmSpec(nodes=1, gpus_per_node=1), [str(worker), str(tmp_path), str(linger)],
                           python=sys.executable)
    job = _run_local_job(script, tmp_path)
    _signal_the_step(job, (tmp_path / "ready").exists)
    out = _wait(job)
    assert (tmp_path / "stopped_cleanly").exists(), f"the worker was killed before it finished stopping:\n{out[-4000:]}"


@pytest.mark.dist
def test_the_early_signal_reaches_the_trainer_which_checkpoints_and_stops(train_data, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "written.sbatch"
    args = ["slurm", "--nodes", "1", "--gpus-per-node", "2", "--script", str(script),
            "tiny_hybrid", "--run-dir", str(run), *train_flags(train_data)]
    proc = _hippo_launch(args, dict(os.environ, PYTHONPATH=str(ROOT)), ROOT)
    assert proc.returncode == 0, proc.stderr
    metrics = run / "metrics.jsonl"
    job = _run_local_job(script.read_text(), tmp_path)
    _signal_the_step(job, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    out = _wait(job)
    assert "received SIGTERM" in out, out[-6000:]
    stopped = latest_step(run)
    assert 3 <= stopped < STEPS, out[-6000:]
    state = json.loads((run / "checkpoints" / f"global_step{stopped}" / "hippo" / "state.json").read_text())
    assert state["reason"] == "signal"


# ------------------------------------------------------------------ the README's commands
def _readme_launch_commands() -> dict[str, list[str]]:
    """`hippo launch ...` lines of README.md's "Running on a cluster", continuations joined."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[2:] for line in lines if line.startswith("hippo launch ")]
    return {cmd[0]: cmd for cmd in commands}


README_COMMANDS = _readme_launch_commands()
README_HOSTS = "node-a slots=8\nnode-b slots=8\n"
"""hosts.txt for the README's DeepSpeed example: two nodes of 8 GPUs, like its other examples."""


def _validate(cmd: list[str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    (cwd / "hosts.txt").write_text(README_HOSTS)
    return _hippo_launch([cmd[0], "--dry-run", *cmd[1:], *extra], dict(os.environ, PYTHONPATH=str(ROOT)), cwd)


def test_the_readme_shows_every_launcher():
    assert sorted(README_COMMANDS) == ["deepspeed", "slurm", "torchrun"]


@pytest.mark.parametrize("launcher", sorted(README_COMMANDS))
def test_the_readmes_launch_commands_are_accepted_as_written(launcher, tmp_path):
    """As written: the default data order serves DP 16 (it refused it while it had 8 streams);
    the world size, the layout and the config's global batch over DP 16 hold too."""
    proc = _validate(README_COMMANDS[launcher], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "hippo launch: --dry-run: nothing started" in proc.stdout
