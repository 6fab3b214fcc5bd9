"""The DeepSpeed launcher with a hostfile (`host slots=N` lines), or one launcher per node (no ssh)."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

from hippo.pretrain.config import ConfigError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots}; a malformed line, a zero slot count or a repeated host names file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hostfile {path} does not exist")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise ConfigError(f"{path}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise ConfigError(f"{path}:{number}: slots must be >= 1, got {slots}")
        if host in hosts:
            raise ConfigError(f"{path}:{number}: host {host!r} listed twice")
        hosts[host] = slots
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no hosts")
    return hosts


def _is_this_machine(host: str) -> bool:
    return host in ("localhost", socket.gethostname(), socket.getfqdn()) or host.startswith("127.")


def deepspeed_command(hostfile: str | Path, worker_argv: list[str], *, master_port: int = 29500,
                      no_ssh: bool = False, node_rank: int | None = None, master_addr: str | None = None,
                      python: str = sys.executable) -> list[str]:
    """`deepspeed` over the hostfile's hosts; with no_ssh, this node's launcher only (start one per
    node with its --node-rank and the first node's --master-addr)."""
    hosts = parse_hostfile(hostfile)
    # --no_local_rank: ranks read LOCAL_RANK from the environment, as under torchrun.
    cmd = [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--master_port", str(master_port),
           "--no_local_rank"]
    if no_ssh:
        if node_rank is None or master_addr is None:
            raise ConfigError("--no-ssh needs --node-rank and --master-addr (the first node's address)")
        if not 0 <= node_rank < len(hosts):
            raise ConfigError(f"--node-rank {node_rank} outside the hostfile's {len(hosts)} hosts")
        cmd += ["--no_ssh", "--node_rank", str(node_rank), "--master_addr", master_addr]
    elif len(hosts) == 1 and _is_this_machine(next(iter(hosts))):
        # One local host: DeepSpeed launches locally, but would still ssh to it to check and to
        # find its address; neither is needed.
        cmd += ["--no_ssh_check", "--master_addr", master_addr or "127.0.0.1"]
    # worker_argv starts with "-m module": the launcher's --module flag takes the module name.
    assert worker_argv[0] == "-m"
    return [*cmd, "--module", *worker_argv[1:]]
