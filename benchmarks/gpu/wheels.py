"""The wheels Hippo needs on the GPU image, and the check that they are all it needs.

The GPU machine (see `benchmarks/gpu/run.sh`) has no network and an image of its own: Python 3.12,
a CUDA build of torch 2.11 with triton 3.6, and the packages in `IMAGE` below, but none of
deepspeed, megatron-core, mlflow, webdataset, zstandard, pydantic or hjson. What is missing travels
beside the tree as cp312 / py3 wheels (tree + wheels <= 64 MiB), installed offline with
`pip install --no-index --no-deps --target`. So the set must be complete by itself: every
`Requires-Dist` of what Hippo imports on the `hippo train` path must be met by a wheel here or by
the image, with exactly one version of each name and nothing else.

    python benchmarks/gpu/wheels.py download [DIR]   # on a machine with the package index
    python3.12 benchmarks/gpu/wheels.py check [DIR]   # markers evaluated for the running Python

DIR defaults to `benchmarks/gpu/wheels` (ignored by git; the device call carries it). `download`
needs the project's own environment (torch installed): DeepSpeed is published as an sdist only,
so its wheel is built here (`pip wheel --no-build-isolation`, no ops prebuilt: a pure-Python
`py3-none-any` wheel; Hippo uses no DeepSpeed CUDA op). Tracking uses `mlflow-skinny` (the same
`mlflow` package without the UI and server extras) plus SQLAlchemy and Alembic for the local
`sqlite:///RUN_DIR/mlflow.db` store: the full `mlflow` wheel set does not fit the 64 MiB.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

try:  # the GPU image and the project environment have packaging; a bare pyenv Python has pip's copy
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pragma: no cover - depends on the interpreter running the check
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "benchmarks" / "gpu" / "wheels"
LIMIT_BYTES = 64 * 2**20

# The image's Python packages ("cuda" image, KINDS.md of the device tool, read 2026-11-17), with
# the versions a session's `pip list` showed there where known. A requirement on a package listed
# without a version is taken as met and printed as an assumption.
IMAGE_VERSIONS = {
    "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2",
    "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0", "jax": "0.11.2",
    "accelerate": "1.15.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
}
IMAGE = set(IMAGE_VERSIONS) | set("""
absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx humanize hypothesis idna imageio iniconfig interface-meta jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
ninja numba numba-cuda numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu scikit-build-core scikit-image
scikit-learn scipy seaborn sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile timm toolz torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
treescope typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split())

# What travels: one pin per name, each the version the CPU test suite runs with.
WHEELS = [
    "deepspeed==0.19.8", "megatron-core==0.16.1", "hjson==3.1.0", "pydantic==2.14.4",
    "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "zstandard==0.25.0", "webdataset==1.0.2", "braceexpand==0.1.7",
    "mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1", "mako==1.4.3",
    "cachetools==7.3.3", "databricks-sdk==0.167.0", "google-auth==2.63.1", "cryptography==50.0.2",
    "cffi==2.1.1", "pycparser==3.12", "pyasn1==0.6.5", "pyasn1-modules==0.4.2", "fastapi==0.165.0",
    "starlette==1.10.0", "gitpython==3.2.1", "gitdb==4.0.12", "smmap==5.0.3",
    "importlib-metadata==9.1.0", "opentelemetry-api==1.45.2", "opentelemetry-proto==1.45.2",
    "opentelemetry-sdk==1.45.2", "opentelemetry-semantic-conventions==0.66b2", "python-dotenv==1.2.4",
    "sqlparse==0.6.1", "uvicorn==0.55.0",
]
# Hippo's `dependencies` as they are met on the image: mlflow by mlflow-skinny and the SQL store.
SUBSTITUTES = {"mlflow": ["mlflow-skinny", "sqlalchemy", "alembic"]}
NEVER = ("torch", "triton")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def pinned(spec: str) -> tuple[str, str]:
    name, version = spec.split("==")
    return canonicalize_name(name), version


def hippo_requirements() -> list[Requirement]:
    """pyproject's runtime dependencies, with `SUBSTITUTES` applied."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        req = Requirement(dep)
        names = SUBSTITUTES.get(canonicalize_name(req.name))
        out += [Requirement(n) for n in names] if names else [req]
    return out + [Requirement("torch>=2.4")]


def download(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for spec in WHEELS:
        name, version = pinned(spec)
        if any(canonicalize_name(parse_wheel_filename(p.name)[0]) == name for p in dest.glob("*.whl")):
            continue
        if name == "deepspeed":  # sdist only: built here, with the torch of this environment
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), spec]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                   "--abi", "none", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest), spec]
        print("hippo: fetching", spec, flush=True)
        subprocess.run(cmd, check=True, env={"DS_BUILD_OPS": "0", **os.environ})


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as z:
        [meta] = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        return Parser().parsestr(z.read(meta).decode())


def tree_bytes() -> int:
    """What the device call sends besides the wheels: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def check(dest: Path, *, tree: int | None = None) -> list[str]:
    """Problems with the set in `dest` (empty: complete); prints what it verified."""
    problems: list[str] = []
    wheels = sorted(dest.glob("*.whl"))
    supported = set(sys_tags())
    have: dict[str, tuple[Version, object]] = {}
    for path in wheels:
        name, version, _, tags = parse_wheel_filename(path.name)
        name = canonicalize_name(name)
        if name in have:
            problems.append(f"two versions of {name}: {have[name][0]} and {version}")
        if name in NEVER or name.startswith("nvidia-"):
            problems.append(f"{path.name}: the image's CUDA build provides {name}; it must not travel")
        if not tags & supported:
            problems.append(f"{path.name}: no tag this Python ({sys.version.split()[0]}) can install")
        have[name] = (version, wheel_metadata(path))
    for spec in WHEELS:
        name, version = pinned(spec)
        if name not in have:
            problems.append(f"{spec} is missing from {dest} (run: python benchmarks/gpu/wheels.py download)")
        elif str(have[name][0]) != version:
            problems.append(f"{name} is {have[name][0]} in {dest}, pinned {version}")

    assumed: list[str] = []
    needed: set[str] = set()

    def satisfy(req: Requirement, by: str) -> None:
        name = canonicalize_name(req.name)
        if name in have:
            version = have[name][0]
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{by} needs {req}, the set has {name} {version}")
            if name not in needed:
                needed.add(name)
                for extra_req in requirements_of(have[name][1], req.extras):
                    satisfy(extra_req, f"{name} {version}")
        elif name in IMAGE:
            known = IMAGE_VERSIONS.get(name)
            if known is None:
                if str(req.specifier):
                    assumed.append(f"{name}{req.specifier} (for {by})")
            elif not req.specifier.contains(Version(known), prereleases=True):
                problems.append(f"{by} needs {req}, the image has {name} {known}")
        else:
            problems.append(f"{by} needs {req}: neither in the wheel set nor on the image")

    for req in hippo_requirements():
        satisfy(req, "hippo")
    for name in sorted(set(have) - needed):
        problems.append(f"{name}: in the set but nothing on the hippo train path needs it")

    size = sum(p.stat().st_size for p in wheels)
    tree = tree_bytes() if tree is None else tree
    print(f"hippo: {len(wheels)} wheels, {size / 2**20:.1f} MiB; tree {tree / 2**20:.1f} MiB; "
          f"together {(size + tree) / 2**20:.1f} MiB of {LIMIT_BYTES / 2**20:.0f} MiB "
          f"(Python {sys.version.split()[0]}, {len(needed)} packages needed beyond the image)")
    if size + tree > LIMIT_BYTES:
        problems.append(f"tree + wheels {(size + tree) / 2**20:.1f} MiB > 64 MiB")
    for line in sorted(set(assumed)):
        print("hippo: assumed met by the image (version not recorded):", line)
    return problems


def requirements_of(meta, extras) -> list[Requirement]:
    """A distribution's Requires-Dist that apply to this interpreter, with the requested extras."""
    out = []
    for text in meta.get_all("Requires-Dist") or []:
        req = Requirement(text)
        if req.marker is None:
            out.append(req)
        elif any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            out.append(req)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["download", "check"])
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.command == "download":
        download(args.dir)
    problems = check(args.dir)
    for p in problems:
        print("hippo: wheel set:", p)
    print("hippo: wheel set complete" if not problems else f"hippo: wheel set incomplete ({len(problems)} problems)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
