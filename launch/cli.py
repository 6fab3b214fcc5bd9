"""`hippo launch torchrun|deepspeed|slurm`: the same `hippo train` under the launchers clusters run."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

from hippo.launch.env import HOST_DECIDED, forwarded_env, job_env, train_argv, worker_env
from hippo.launch.torchrun import show


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _run(cmd: list[str], *, dry_run: bool, env: dict[str, str] | None = None, signal_group: bool = False) -> int:
    """Print the command, then run it (unless `dry_run`: the layout is checked, nothing starts) and
    return its exit code (128 + N for a child ended by signal N, as a shell reports it).

    The child gets its own process group, so a Ctrl-C at the terminal reaches it once, through
    the launcher: SIGTERM/SIGINT to the launcher are passed on and the launcher waits for the
    job to checkpoint and stop, then exits 128 + N like `hippo train` (torchrun itself exits 1
    after a signal). `signal_group`: to the child's whole group (the DeepSpeed runner dies of a
    SIGTERM without passing it on to its workers), else to the child alone (torchrun passes it to
    its workers and waits for them)."""
    print(f"hippo launch: {show(cmd)}", flush=True)
    if dry_run:
        print("hippo launch: --dry-run: nothing started")
        return 0
    child = subprocess.Popen(cmd, env=worker_env() if env is None else env, process_group=0)
    with _signals_passed_to(child, group=signal_group) as received:
        code = child.wait()
    if received and code != 0:
        return 128 + received[0]
    return 128 - code if code < 0 else code


@contextlib.contextmanager
def _signals_passed_to(child: subprocess.Popen, *, group: bool) -> Iterator[list[int]]:
    """Yields the signals passed on so far."""
    received: list[int] = []

    def forward(signum: int, frame) -> None:
        received.append(signum)
        print(f"hippo launch: passing {signal.Signals(signum).name} to the job (pid {child.pid}); waiting for it "
              "to checkpoint and stop", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum) if group else child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _validated_train_args(args: argparse.Namespace, world_size: int, *, starts_now: bool = False) -> list[str]:
    """Refuse, before anything starts, a config that cannot run on the launcher's world size, a
    run folder that is a file, and (for a job that `starts_now`) one a live trainer holds: a second
    job is refused once, here, not once per rank and restart."""
    from hippo.pretrain.config import load_config, run_folder
    from hippo.pretrain.run_lock import RunLock

    load_config(args.config, args.set).layout(world_size)
    run_dir = run_folder(args.config, args.run_dir)
    if starts_now:
        RunLock(run_dir).check_free()
    return train_argv(args.config, args.run_dir, args.set)


def _cmd_torchrun(args: argparse.Namespace) -> int:
    from hippo.launch.torchrun import TorchrunSpec, torchrun_command

    spec = TorchrunSpec(args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.max_restarts, args.rdzv_id,
                        args.local_addr, args.rdzv_host)
    argv = _validated_train_args(args, spec.nnodes * spec.nproc_per_node, starts_now=not args.dry_run)
    cmd = torchrun_command(spec, argv)
    return _run(cmd, dry_run=args.dry_run)


def _cmd_deepspeed(args: argparse.Namespace) -> int:
    from hippo.launch.deepspeed_launcher import deepspeed_command, parse_hostfile

    world_size = sum(parse_hostfile(args.hostfile).values())
    cmd = deepspeed_command(args.hostfile, _validated_train_args(args, world_size, starts_now=not args.dry_run),
                            master_port=args.master_port,
                            no_ssh=args.no_ssh, node_rank=args.node_rank, master_addr=args.master_addr)
    # DeepSpeed's runner adds the exports of the file DS_ENV_FILE names to its ssh command.
    forwarded = forwarded_env()
    env_file = Path(args.run_dir or ".") / ".hippo_deepspeed_env"
    if forwarded:
        print(f"hippo launch: forwarding {', '.join(sorted(forwarded))} to every node (via {env_file})")
        if not args.dry_run:
            env_file.parent.mkdir(parents=True, exist_ok=True)
            env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(forwarded.items())))
    return _run(cmd, dry_run=args.dry_run, env={**worker_env(), "DS_ENV_FILE": str(env_file.resolve())}
                if forwarded else None, signal_group=True)


def _cmd_slurm(args: argparse.Namespace) -> int:
    from hippo.launch.slurm import SlurmSpec, sbatch_script

    spec = SlurmSpec(args.nodes, args.gpus_per_node, job_name=args.job_name, time=args.time,
                     partition=args.partition, max_restarts=args.max_restarts)
    script = sbatch_script(spec, _validated_train_args(args, spec.nodes * spec.gpus_per_node))
    out = Path(args.script)
    out.write_text(script)
    os.chmod(out, 0o755)
    print(f"hippo launch: wrote {out}")
    if not args.submit:
        return 0
    if left := [k for k in HOST_DECIDED if k in os.environ]:
        print(f"hippo launch: not passing this host's {', '.join(left)} to the job (each worker sets them itself)")
    return _run(["sbatch", str(out)], dry_run=args.dry_run, env=job_env())


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (path or shipped name)")
    p.add_argument("--run-dir", help="run folder on a filesystem every node sees")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config against the world size, print the command (slurm: write the script), "
                        "start nothing")


def register(subparsers) -> None:
    launch = subparsers.add_parser("launch", help="run hippo train under torchrun, the DeepSpeed launcher or SLURM")
    sub = launch.add_subparsers(dest="launcher", required=True)

    p = sub.add_parser("torchrun", help="one torchrun agent per node (run this command on every node)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--rdzv-endpoint", default="127.0.0.1:29500", help="HOST:PORT on the first node")
    p.add_argument("--rdzv-id", help="the job's id, the same on every node (default: a fresh one on one node; "
                   "on several, one from the endpoint: pass the scheduler's job id there)")
    p.add_argument("--local-addr", help="address this node's ranks are reached at (default: its hostname's)")
    p.add_argument("--rdzv-host", action="store_true",
                   help="this node hosts the rendezvous (when the endpoint is not its hostname)")
    p.add_argument("--max-restarts", type=int, default=3)
    _train_options(p)
    p.set_defaults(func=_cmd_torchrun)

    p = sub.add_parser("deepspeed", help="the DeepSpeed launcher over a hostfile ('host slots=N' lines)")
    p.add_argument("--hostfile", required=True)
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--no-ssh", action="store_true", help="start only this node's ranks (run on every node)")
    p.add_argument("--node-rank", type=int)
    p.add_argument("--master-addr")
    _train_options(p)
    p.set_defaults(func=_cmd_deepspeed)

    p = sub.add_parser("slurm", help="write (and with --submit, submit) an sbatch script")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--script", default="hippo.sbatch")
    p.add_argument("--job-name", default="hippo")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--submit", action="store_true")
    _train_options(p)
    p.set_defaults(func=_cmd_slurm)
