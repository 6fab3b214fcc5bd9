"""Hippo installs one import namespace, `hippo`: a wheel holds nothing else at its top level, and
an editable install does not make the design's folder names (`kernels`, `parallel`, ...)
importable, so other projects' packages of those names stay theirs."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True)
    (path,) = out.glob("hippo_pretrain-*.whl")
    return path


def test_the_wheel_has_one_top_level_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"hippo"}
    assert "hippo/kernels/h3_core.py" in names and "hippo/pretrain/models/h3.py" in names
    assert "hippo/configs/hybrid_1.3b.yaml" in names  # the shipped configs travel with the package
    assert "hippo/pretrain/hf_files/modeling_hippo.py" in names  # copied into `hippo export --format hf`
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hippo = hippo.pretrain.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_editable_install_exposes_only_hippo(tmp_path):
    script = """
import importlib.util, json
found = {name: getattr(importlib.util.find_spec(name), "origin", None)
         for name in ("kernels", "parallel", "launch", "pretrain", "data_pipeline")}
import hippo.kernels, hippo.pretrain.config
print(json.dumps({"bare": found, "kernels": hippo.kernels.__file__,
                  "configs": str(hippo.pretrain.config.CONFIG_DIR)}))
"""
    import json

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    seen = json.loads(out.stdout)
    # Another project's package of such a name (transformers' dependency `kernels`) is found where it is installed.
    ours = [origin for origin in seen["bare"].values()
            if origin and str(ROOT) in origin and "site-packages" not in origin]
    assert not ours, seen["bare"]
    assert seen["kernels"] == str(ROOT / "kernels" / "__init__.py")
    assert (ROOT / "configs" / "tiny_hybrid.yaml").samefile(f"{seen['configs']}/tiny_hybrid.yaml")
