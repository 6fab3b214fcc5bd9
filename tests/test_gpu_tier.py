"""The GPU command (`benchmarks/gpu/run.sh`) as far as a machine without a GPU can check it: the
tier skips cleanly without CUDA, its CPU dry run passes, the wheel set's completeness check
catches what it must, and the command refuses bad arguments in one line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

RUN_SH = ROOT / "benchmarks" / "gpu" / "run.sh"


def _wheels_module():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "benchmarks" / "gpu" / "wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_tier_is_collected_and_skipped_with_the_reason_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "HIPPO_GPU_DRY_RUN"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-rs", "-p",
                           "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert proc.stdout.count("needs a CUDA device") >= 1, proc.stdout[-3000:]
    n_skipped = int(summary.split(" skipped")[0].split()[-1])
    assert n_skipped >= 15, summary  # kernels, models, CLI: the tier is really there


@pytest.mark.slow
def test_dry_run_of_the_gpu_command_passes_on_the_cpu(tmp_path):
    """The whole command on this CPU (tiny shapes): every test of the tier runs and passes, and
    every row of the table is produced."""
    env = dict(os.environ, HIPPO_PYTHON=sys.executable, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", str(RUN_SH), "--dry-run", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= 15 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
    table = (tmp_path / "out" / "perf.md").read_text()
    for row in ("| env |", "| train h3_125m |", "| train hybrid_125m |", "| train transformer_125m |",
                "| flashconv L=256 |", "| layer L=64 |", "| generate hybrid_125m |", "| generate transformer_125m |"):
        assert row in table, table
    assert "FAILED" not in table, table


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as z:
        meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        z.writestr(f"{dist}.dist-info/METADATA", "\n".join(meta) + "\n")


def test_wheel_set_check_finds_missing_extra_and_duplicate_wheels(tmp_path, monkeypatch):
    """The completeness check against an independent small world: Hippo needs `alpha`, which needs
    `beta>=2` and the image's numpy; a set missing beta, holding an unneeded gamma, or two versions
    of alpha, is refused for exactly that."""
    wheels = _wheels_module()
    monkeypatch.setattr(wheels, "WHEELS", ["alpha==1.0", "beta==2.1"])
    monkeypatch.setattr(wheels, "hippo_requirements", lambda: [wheels.Requirement("alpha>=1"),
                                                               wheels.Requirement("numpy>=1.26")])
    good = tmp_path / "good"
    good.mkdir()
    _fake_wheel(good, "alpha", "1.0", ["beta>=2", "numpy", 'zeta; python_version < "3.0"', "omega; extra == 'x'"])
    _fake_wheel(good, "beta", "2.1", [])
    assert wheels.check(good, tree=0) == []

    missing = tmp_path / "missing"
    missing.mkdir()
    _fake_wheel(missing, "alpha", "1.0", ["beta>=2"])
    problems = wheels.check(missing, tree=0)
    assert any("beta==2.1 is missing" in p for p in problems) and any("needs beta>=2" in p for p in problems)

    extra = tmp_path / "extra"
    extra.mkdir()
    for args in (("alpha", "1.0", ["beta>=2"]), ("beta", "2.1", []), ("gamma", "0.1", [])):
        _fake_wheel(extra, *args)
    assert wheels.check(extra, tree=0) == ["gamma: in the set but nothing on the hippo train path needs it"]

    old = tmp_path / "old"
    old.mkdir()
    _fake_wheel(old, "alpha", "1.0", ["beta>=3"])
    _fake_wheel(old, "beta", "2.1", [])
    _fake_wheel(old, "torch", "2.11.0", [])
    problems = wheels.check(old, tree=0)
    assert any("needs beta>=3, the set has beta 2.1" in p for p in problems)
    assert any("torch" in p and "must not travel" in p for p in problems)


def test_wheel_set_pins_cover_hippo_dependencies_one_version_each():
    wheels = _wheels_module()
    names = [wheels.pinned(p)[0] for p in wheels.WHEELS]
    assert len(names) == len(set(names))
    for req in wheels.hippo_requirements():
        name = wheels.canonicalize_name(req.name)
        assert name in names or name in wheels.IMAGE, name


@pytest.mark.parametrize("args,message", [(["--part", "3", "x"], "--part must be 1 or 2"),
                                          (["--dry-run"], "OUT_DIR missing"), (["--fast", "x"], "unknown option --fast")])
def test_gpu_command_refuses_bad_arguments_in_one_line(args, message):
    proc = subprocess.run(["bash", str(RUN_SH), *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
