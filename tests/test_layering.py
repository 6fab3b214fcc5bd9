"""Hippo's packages import only downward: kernels <- models <- parallel <- training side <- CLI.

Every module's imports (top-level and inside functions) are read with `ast`, so a lazy upward
import fails here too. `data_pipeline` stands alone; `launch` validates through the run config
and never reaches torch or `hippo.parallel`'s engine side on a launching host.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = {"kernels": "hippo.kernels", "pretrain": "hippo.pretrain", "parallel": "hippo.parallel",
            "data_pipeline": "hippo.data_pipeline", "launch": "hippo.launch"}

# Layer of each part (longest prefix wins) and the Hippo parts each may import.
PARTS = ["hippo.kernels", "hippo.pretrain.models", "hippo.parallel", "hippo.data_pipeline", "hippo.pretrain",
         "hippo.launch", "hippo.pretrain.cli"]
MAY_IMPORT = {
    "hippo.kernels": {"hippo.kernels"},
    "hippo.pretrain.models": {"hippo.kernels", "hippo.pretrain.models"},
    "hippo.parallel": {"hippo.kernels", "hippo.pretrain.models", "hippo.parallel"},
    "hippo.data_pipeline": {"hippo.data_pipeline"},
    "hippo.pretrain": {"hippo.kernels", "hippo.pretrain.models", "hippo.parallel", "hippo.data_pipeline", "hippo.pretrain"},
    "hippo.launch": {"hippo.launch", "hippo.pretrain"},  # the run config only: see the no-torch test
    "hippo.pretrain.cli": set(PARTS),
}
THIRD_PARTY = {  # beyond the standard library; None: anything
    "hippo.kernels": {"torch", "triton"},
    "hippo.pretrain.models": {"torch", "safetensors"},  # safetensors: `from_pretrained` folders
    "hippo.launch": set(),
}


def part_of(module: str) -> str:
    return max((p for p in PARTS if module == p or module.startswith(p + ".")), key=len)


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imported_names(module: str, path: Path) -> set[str]:
    """Absolute names of every module `module` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def violations(module: str, path: Path) -> list[str]:
    part = part_of(module)
    found = []
    for name in imported_names(module, path):
        top = name.split(".")[0]
        if top in PACKAGES:
            found.append(f"{module} imports the bare package {name!r}: use hippo.{name}")
        elif top == "hippo":
            if part_of(name) not in MAY_IMPORT[part]:
                found.append(f"{module} ({part}) imports {name} ({part_of(name)})")
        elif part in THIRD_PARTY and top not in sys.stdlib_module_names and top not in THIRD_PARTY[part]:
            found.append(f"{module} ({part}) imports third-party {name}")
    return found


def test_every_module_imports_only_downward():
    found = [v for module, path in modules().items() for v in violations(module, path)]
    assert not found, "\n".join(found)


def test_the_check_catches_an_upward_import(tmp_path):
    upward = tmp_path / "engine.py"
    upward.write_text("def f():\n    from hippo.pretrain.config import HippoConfig\n")
    assert violations("hippo.parallel.engine", upward) == [
        "hippo.parallel.engine (hippo.parallel) imports hippo.pretrain.config (hippo.pretrain)"]
    relative = tmp_path / "cfg.py"
    relative.write_text("from ..parallel.engine import TrainEngine\n")
    assert violations("hippo.pretrain.models.cfg", relative)  # resolves to hippo.pretrain.parallel.engine: not models


def test_launching_a_run_loads_no_torch():
    """Building every launcher's command and validating the layout, as on a login node."""
    script = """
import sys
from hippo.launch.cli import _validated_train_args
from hippo.launch.env import worker_env
from hippo.launch.slurm import SlurmSpec, sbatch_script
from hippo.launch.torchrun import TorchrunSpec, torchrun_command
import argparse
args = argparse.Namespace(config="hybrid_1.3b", run_dir="/shared/r", set=["parallel.tensor=2"])
argv = _validated_train_args(args, 16)
torchrun_command(TorchrunSpec(2, 8, "node-a:29500", 3, None, None, None), argv)
worker_env()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deepspeed", "megatron", "triton")
                or m.startswith(("hippo.parallel.engine", "hippo.parallel.groups", "hippo.pretrain.models.lm")))
print(loaded)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-3000:]
