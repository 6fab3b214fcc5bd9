"""benchmarks/gpu_check.py, the GPU acceptance check, on this CPU machine.

The dry run is run the way the first GPU machine will meet the script: from the repository
root, with `hippo` not importable (the script's own finder must map it onto the folders) and
with deepspeed, megatron, mlflow, webdataset, PyYAML and safetensors blocked from import.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HEAVY = ("deepspeed", "megatron", "mlflow", "webdataset")
# What the H200 environment may lack on top of HEAVY, and the package itself (not installed there).
MISSING_THERE = HEAVY + ("yaml", "safetensors", "hippo")

# Runs the script as `python benchmarks/gpu_check.py ...` would, after installing a finder that
# raises ImportError for the blocked top-level names (also for find_spec probes).
_WRAPPER = """
import importlib.abc, runpy, sys
BLOCKED = set({blocked!r})

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is blocked by tests/test_gpu_check.py", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[name]
sys.argv = [{script!r}, *{args!r}]
sys.path[0] = {scriptdir!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def _run(args: list[str], blocked=MISSING_THERE, timeout=240) -> subprocess.CompletedProcess:
    code = _WRAPPER.format(blocked=tuple(blocked), script=str(SCRIPT), scriptdir=str(SCRIPT.parent), args=args)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)  # module level: stdlib only
    return module


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| section")]


@pytest.mark.slow  # 6-30 s on the 2-core machine, depending on its load
def test_dry_run_passes_without_the_package_or_heavy_dependencies(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = _run(["--dry-run", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    rows = _rows(table)
    sections = {r[0] for r in rows}
    assert {"env", "configs", "kernels", "layer", "train", "generate", "imports", "time"} <= sections, sections
    assert not [r for r in rows if r[2] == "FAIL"], table
    assert "raised at" not in table  # no case and no section crashed
    by_check = {(r[0], r[1]): r for r in rows}
    assert by_check[("env", "hippo import")][3] == "repo shim over pyproject's package-dir", table
    assert "fallback parser" in by_check[("env", "configs / checkpoints")][3]
    assert "stub" in by_check[("env", "configs / checkpoints")][5]
    assert by_check[("imports", "no deepspeed / megatron / mlflow / webdataset")][2] == "PASS"
    assert by_check[("train", "loss falls")][2] == "PASS"
    for name in ("h3_125m", "hybrid_125m", "transformer_125m"):
        assert by_check[("configs", f"{name} on meta")][2] == "PASS"
    if importlib.util.find_spec("triton") is not None:  # the Triton rows ran under the interpreter
        assert [r for r in rows if r[1].startswith("h3_core triton") and r[2] == "PASS"], table
    assert table.startswith("## GPU acceptance check: dry run on CPU")


def test_a_numeric_failure_exits_nonzero(tmp_path):
    out = tmp_path / "failed.md"
    proc = _run(["--dry-run", "--sections", "kernels", "--tolerance-scale", "0", "--out", str(out)],
                blocked=HEAVY, timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "Result: FAILED" in table
    failed = [r for r in _rows(table) if r[2] == "FAIL"]
    assert failed and all(r[0] == "kernels" for r in failed), table
    assert "raised at" not in table  # failed on the numbers, not by crashing


def test_bounds_are_the_tests_bounds():
    """The script's copies of the bounds equal the values the kernel tests hold the code to."""
    gc = _load_script()
    from tests.kernels import test_flashconv_triton as t

    assert gc.TOL == t.TOL and gc.UNIT_ROUNDOFF == t.UNIT_ROUNDOFF
    assert gc.U32 == t.U32 and gc.ROUNDINGS == t.ROUNDINGS
    for tag in ("bf16", "fp16", "fp32"):
        for roundings, n, L in ((18, 16, 256), (9, 64, 2048), (18, 128, 8192)):
            assert gc.h3_bound(tag, roundings, n, L) == t.h3_bound(tag, roundings, n, L)
    # Literal tolerances of other tests the script cites: fail here when they change there.
    h3_core_tests = (ROOT / "tests" / "kernels" / "test_h3_core.py").read_text()
    assert (gc.LAYER_RTOL, gc.LAYER_ATOL) == (2e-4, 2e-5) and "rtol=2e-4, atol=2e-5" in h3_core_tests
    assert gc.CHUNKED_TOL == 1e-5 and "assert _rel(y, ref) <= 1e-5" in h3_core_tests
    lm_tests = (ROOT / "tests" / "models" / "test_lm.py").read_text()
    assert gc.RECURRENT_TOL == 1e-4 and "assert err <= 1e-4" in lm_tests


def test_fallback_yaml_parser_reads_every_config_like_pyyaml():
    yaml = pytest.importorskip("yaml")
    gc = _load_script()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert gc.parse_simple_yaml(path.read_text()) == yaml.safe_load(path.read_text()), path.name
    with pytest.raises(ValueError, match="unsupported YAML"):
        gc.parse_simple_yaml("model:\n  - 1\n")


def test_model_configs_match_the_project_loader():
    from hippo.pretrain.config import load_config

    gc = _load_script()
    for name in ("h3_125m", "hybrid_125m", "transformer_125m", "tiny_hybrid"):
        assert gc.load_model_config(name) == load_config(ROOT / "configs" / f"{name}.yaml").model, name


def test_repo_finder_mirrors_pyproject_package_dir():
    import tomllib

    gc = _load_script()
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    dirs = gc.package_dirs()
    assert {k: v.relative_to(ROOT).as_posix() for k, v in dirs.items()} == mapping
    assert gc._FALLBACK_PACKAGE_DIR == mapping
    finder = gc.RepoFinder(dirs)
    assert Path(finder.find_spec("hippo.pretrain.models.h3").origin) == ROOT / "pretrain" / "models" / "h3.py"
    assert Path(finder.find_spec("hippo.kernels").origin) == ROOT / "kernels" / "__init__.py"
    assert finder.find_spec("hippo").submodule_search_locations == []
    assert finder.find_spec("hippo.kernels.no_such_module") is None
    assert finder.find_spec("numpy") is None


def test_gpu_kernel_plan_follows_the_path_selection_rules():
    """The GPU rows (not reachable on CPU): Triton wherever select_impl picks it, the chunked
    fallback for fp32 beyond FP32_MAX_LEN, and no Triton row below sm_80 or without triton."""
    gc = _load_script()
    plan = gc.kernel_plan(gc.Setup(dry_run=False, device=None, capability=(9, 0), interpret=False,
                                   triton_installed=True))
    assert len(plan) == len(gc.DTYPE_TAGS) * len(gc.KERNEL_LENGTHS)
    fallback = [(tag, L) for tag, L, path, _ in plan if path != "triton"]
    assert fallback == [("fp32", 4096), ("fp32", 8192)]
    old = gc.kernel_plan(gc.Setup(dry_run=False, device=None, capability=(7, 5), interpret=False,
                                  triton_installed=True))
    assert {path for _, _, path, _ in old} == {"torch"} and "compute capability 7.5" in old[0][3]
    none = gc.kernel_plan(gc.Setup(dry_run=False, device=None, capability=(9, 0), interpret=False,
                                   triton_installed=False))
    assert {path for _, _, path, _ in none} == {"torch"}


def test_a_crashing_case_is_a_failed_row_and_the_run_goes_on():
    gc = _load_script()
    report = gc.Report()
    with report.guard("kernels", "flashconv bf16 L=256 fwd+bwd"):
        raise RuntimeError("triton compile error")
    report.bounded("kernels", "next case", {"y": 1e-3}, 1e-2)
    report.bounded("kernels", "nan", {"y": float("nan")}, 1e-2)
    assert [r.status for r in report.rows] == ["FAIL", "PASS", "FAIL"] and report.failed()
    assert "RuntimeError: triton compile error" in report.rows[0].measured
    table = gc.render_table(report, "t")
    assert table.count("| kernels |") == 3 and "Result: FAILED (1 PASS, 2 FAIL)" in table
