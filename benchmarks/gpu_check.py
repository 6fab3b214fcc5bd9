"""GPU acceptance check: the first command to run on a machine with a GPU.

    python benchmarks/gpu_check.py                  # one GPU, target < 8 min, no network
    python benchmarks/gpu_check.py --out gpu_check.md
    python benchmarks/gpu_check.py --dry-run        # CPU and meta device, tiny shapes, 6-25 s on 2 cores

It prints one Markdown table and writes it to --out (default benchmarks/results/gpu_check.md,
or benchmarks/results/gpu_check_dry_run.md with --dry-run). Exit status: 0 when every check
passes, 1 when any check fails (a numeric error over its bound, a loss that does not fall, a
non-finite value, or a section that raised), 2 when there is no CUDA device and --dry-run was
not given. Sections (--sections picks some):

  env       Python, torch, triton, the device and its peak bf16 FLOP/s
            (`hippo.parallel.runtime.detected_peak_flops`), where `hippo` was imported from.
  configs   h3_125m, hybrid_125m, transformer_125m built on the meta device: parameter count
            against a closed form, embedding shape, one mixer per layer as configured.
  kernels   Triton FlashConv against float64 torch references, forward and backward, for
            bf16 / fp16 / fp32 and L = 256 ... 8192, wherever `select_impl` picks "triton":
            - `flashconv` (fused q * (conv(u v, k) + D u v)): y and every input gradient,
              max-norm relative error <= TOL[dtype];
            - `h3_core(impl="triton")`: y and every SSM-parameter gradient, normwise, <= h3_bound.
            Where "auto" does not pick Triton (fp32 with L > FP32_MAX_LEN = 2048: no clean 3xTF32
            configuration) the row checks the chunked path it falls back to, and one row checks
            that an explicit impl="triton" refuses such input.
  layer     The H3 layer with conv_impl="auto" against conv_impl="reference": fp32 at the shape
            and tolerances of tests/kernels/test_h3_core.py, and bf16 autocast at d_model 768,
            L = 2048 (the training shape).
  train     30 steps of hybrid_125m, one GPU, bf16 autocast, L = 2048, micro-batch 8 (its YAML),
            synthetic tokens, a plain torch loop (AdamW with the project's three parameter
            groups, gradient clipping): the loss falls, tokens/s, MFU
            (`hippo.pretrain.flops.train_flops_per_token` / peak), peak memory
            (`torch.cuda.max_memory_allocated`), and every path `select_impl` chose.
  generate  h3_125m, hybrid_125m, transformer_125m: batch 64, prompt 1536, 128 new tokens,
            greedy, bf16 autocast: prefill seconds and decode tokens/s; plus recurrent decoding
            against a full forward pass (fp32, batch 2) within the tests' 1e-4.

Where the bounds come from (defined once here, checked equal to the tests' values by
tests/test_gpu_check.py):
  TOL, UNIT_ROUNDOFF, U32, ROUNDINGS, h3_bound   tests/kernels/test_flashconv_triton.py
  CHUNKED_TOL = 1e-5        tests/kernels/test_h3_core.py::test_fast_path_matches_float64_direct
  LAYER_RTOL, LAYER_ATOL    tests/kernels/test_h3_core.py::test_h3_module_routes_through_selectable_impl
  RECURRENT_TOL = 1e-4      tests/models/test_lm.py::test_recurrent_mode_matches_full_pass
                            (absolute there on O(1) logits; relative to max |logits| here)
  LAYER_BF16_ROUNDINGS      derived here the way h3_bound is: the core's 18 roundings plus 12
                            from bf16 autocast (input, weight and output of the q, k, v and out
                            projections), against the fp32 reference layer.
The fp32 references on the GPU are float64 FFT convolutions (`kernels.fftconv` in float64,
`h3_core_ref` with complex128 SSM kernels), ~1e-15 from the tests' direct float64 oracle.

Runs without the package installed: when `import hippo.kernels` fails (or resolves to another
checkout), a meta-path finder maps `hippo.<pkg>` to this repository's folders exactly as
pyproject.toml's [tool.setuptools.package-dir] does (read with tomllib). Dependencies: torch
and, for the kernels, triton. It never imports deepspeed, megatron, mlflow or webdataset (the
last table row checks sys.modules). PyYAML is optional (a small parser reads the configs when
it is missing); safetensors is optional (hippo.pretrain.models.lm imports it for checkpoints
only; a stub that raises on use stands in when it is missing).

Triton 3.6 (the first GPU machine: Python 3.12, torch 2.11, triton 3.6; this repository pins
triton 3.9): the kernel (`kernels/_flashconv_triton.py`) uses `tl.dot(a, b, acc,
input_precision=...)` with "tf32x3" / "ieee", bitcasts (`.to(tl.int32, bitcast=True)`),
`tl.zeros_like`, string and dtype constexpr comparisons and a constexpr default
(`EMULATE: tl.constexpr = False`); all of these exist in triton 3.x before 3.6 and nothing
newer was found by reading the source, but the kernels have never been compiled with 3.6:
UNVERIFIED until this script has run there. A compile or launch error shows up as a FAIL row
with the exception text.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import platform
import re
import sys
import time
import traceback
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "configs", "kernels", "layer", "train", "generate")
FORBIDDEN_MODULES = ("deepspeed", "megatron", "mlflow", "webdataset")
MODELS_125M = ("h3_125m", "hybrid_125m", "transformer_125m")
TIME_TARGET_S = 480.0

# ----------------------------------------------------------------------------------- bounds
# tests/kernels/test_flashconv_triton.py: flashconv max-norm tolerances per dtype, and the
# a-priori normwise bound of h3_core(impl="triton") outputs.
TOL = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 4e-2}
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-20}
U32 = 2.0**-24
ROUNDINGS = {"y": 18, "grad": 9}


def h3_bound(tag: str, roundings: int, n: int, L: int) -> float:
    """tests/kernels/test_flashconv_triton.py::h3_bound (see its docstring for the derivation)."""
    u = UNIT_ROUNDOFF[tag]
    return 3.0 * ((roundings * u**2 + 8 * n * U32**2) / 3.0) ** 0.5 + L * U32


CHUNKED_TOL = 1e-5
LAYER_RTOL, LAYER_ATOL = 2e-4, 2e-5
RECURRENT_TOL = 1e-4
LAYER_BF16_ROUNDINGS = ROUNDINGS["y"] + 12

DTYPE_TAGS = ("bf16", "fp16", "fp32")
KERNEL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


# --------------------------------------------------------------------- import bootstrapping
_FALLBACK_PACKAGE_DIR = {
    "hippo.kernels": "kernels", "hippo.pretrain": "pretrain", "hippo.parallel": "parallel",
    "hippo.data_pipeline": "data_pipeline", "hippo.launch": "launch", "hippo.configs": "configs",
}


def package_dirs() -> dict[str, Path]:
    """pyproject.toml's [tool.setuptools.package-dir]: hippo.kernels -> <repo>/kernels, ..."""
    try:
        import tomllib

        mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    except Exception:  # no tomllib (< 3.11) or an unreadable pyproject: the same table, by hand
        mapping = _FALLBACK_PACKAGE_DIR
    return {name: REPO / folder for name, folder in mapping.items()}


class RepoFinder(importlib.abc.MetaPathFinder):
    """Finds `hippo` (a namespace) and every `hippo.<pkg>[.sub...]` in the repository folders.

    Mirrors setuptools' editable finder: the longest mapped prefix gives the folder, the rest
    of the dotted name walks below it (package with __init__.py, module .py, or namespace dir).
    """

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dict(sorted(dirs.items(), key=lambda kv: -len(kv[0])))

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname == "hippo":
            spec = importlib.machinery.ModuleSpec("hippo", None, is_package=True)
            spec.submodule_search_locations = []
            return spec
        for pkg, folder in self.dirs.items():
            if fullname == pkg or fullname.startswith(pkg + "."):
                base = folder.joinpath(*fullname[len(pkg):].split(".")[1:])
                break
        else:
            return None
        if (base / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(
                fullname, base / "__init__.py", submodule_search_locations=[str(base)])
        if Path(f"{base}.py").is_file():
            return importlib.util.spec_from_file_location(fullname, f"{base}.py")
        if base.is_dir():
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(base)]
            return spec
        return None


def ensure_hippo() -> str:
    """Make `hippo.*` importable; returns where it comes from (for the env row)."""
    try:
        import hippo.kernels

        where = Path(hippo.kernels.__file__).resolve().parent
        if where == REPO / "kernels":
            return f"installed package (this checkout, {where})"
        why = f"the installed hippo is another checkout ({where})"
    except ImportError as e:
        why = f"import hippo.kernels failed: {e}"
    for name in [m for m in sys.modules if m == "hippo" or m.startswith("hippo.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, RepoFinder(package_dirs()))
    importlib.invalidate_caches()
    import hippo.kernels  # noqa: F401  (raises here if the shim is broken)

    return f"repo shim over pyproject's package-dir ({why})"


def ensure_safetensors() -> str:
    """hippo.pretrain.models.lm imports safetensors (checkpoints only): stub it if missing."""
    try:
        import safetensors  # noqa: F401
        import safetensors.torch  # noqa: F401

        return f"safetensors {getattr(safetensors, '__version__', '?')}"
    except ImportError:
        pass

    def unavailable(*_a, **_k):
        raise RuntimeError("safetensors is not installed (benchmarks/gpu_check.py stub)")

    top = types.ModuleType("safetensors")
    sub = types.ModuleType("safetensors.torch")
    top.safe_open = unavailable
    sub.load_file = sub.save_file = unavailable
    top.torch = sub
    sys.modules["safetensors"], sys.modules["safetensors.torch"] = top, sub
    return "safetensors missing: stub (raises on use; checkpoints are not used here)"


# ------------------------------------------------------------------------------ YAML configs
_YAML_INT = re.compile(r"^[-+]?(0|[1-9][0-9_]*)$")
_YAML_FLOAT = re.compile(r"^[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?$")
_YAML_BOOL = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _yaml_scalar(text: str) -> Any:
    """A plain or quoted scalar as PyYAML's (YAML 1.1) resolver reads it; flow lists of them."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_yaml_scalar(item) for item in inner.split(",")] if inner else []
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text.lower() in _YAML_BOOL:
        return _YAML_BOOL[text.lower()]
    if _YAML_INT.match(text):
        return int(text.replace("_", ""))
    if _YAML_FLOAT.match(text) and text not in (".", "+.", "-."):
        return float(text.replace("_", ""))
    return text


def parse_simple_yaml(text: str) -> dict[str, Any]:
    """The YAML subset of configs/*.yaml (nested mappings by indentation, scalars, flow lists,
    comments), for machines without PyYAML. Anything else raises ValueError."""
    root: dict[str, Any] = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        if body.startswith("- ") or ":" not in body:
            raise ValueError(f"line {lineno}: unsupported YAML for the fallback parser: {raw!r}")
        key, _, value = body.partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value.strip():
            parent[key.strip()] = _yaml_scalar(value)
        else:
            parent[key.strip()] = child = {}
            stack.append((indent, child))
    return root


def read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        import yaml
    except ImportError:
        return parse_simple_yaml(path.read_text()), "fallback parser (no PyYAML)"
    return yaml.safe_load(path.read_text()), f"PyYAML {yaml.__version__}"


def load_run_yaml(name: str) -> dict[str, Any]:
    return read_yaml(REPO / "configs" / f"{name}.yaml")[0]


def load_model_config(name: str, **changes: Any):
    """configs/<name>.yaml's model section as a ModelConfig (what `load_config(...).model` gives,
    without `hippo.pretrain.config`, which imports PyYAML and the data pipeline)."""
    from hippo.pretrain.models.config import ModelConfig

    return ModelConfig(**{**load_run_yaml(name).get("model", {}), **changes})


# ----------------------------------------------------------------------------- result rows
@dataclass
class Row:
    section: str
    check: str
    status: str  # PASS | FAIL | WARN | SKIP | INFO
    measured: str = ""
    bound: str = ""
    details: str = ""
    seconds: float | None = None


class Report:
    def __init__(self, tolerance_scale: float = 1.0):
        self.rows: list[Row] = []
        self.tolerance_scale = tolerance_scale

    def add(self, section: str, check: str, status: str, measured: str = "", bound: str = "",
            details: str = "", seconds: float | None = None) -> Row:
        row = Row(section, check, status, measured, bound, details, seconds)
        self.rows.append(row)
        print(f"[{row.status}] {section}: {check}  {measured}  {bound}  {details}", flush=True)
        return row

    def bounded(self, section: str, check: str, errors: dict[str, float], bounds: dict[str, float] | float,
                details: str = "", seconds: float | None = None) -> Row:
        """PASS iff every error is finite and <= its bound x tolerance_scale; shows the worst."""
        if not isinstance(bounds, dict):
            bounds = {q: bounds for q in errors}
        scale = self.tolerance_scale
        ratios = {q: (e / (bounds[q] * scale) if bounds[q] * scale > 0 else math.inf) if math.isfinite(e) else math.inf
                  for q, e in errors.items()}
        worst = max(ratios, key=ratios.get)
        ok = all(r <= 1.0 for r in ratios.values())
        shown = f"{worst} {errors[worst]:.2e}"
        if worst != "y" and "y" in errors:
            shown += f" (y {errors['y']:.2e})"
        bound = f"{bounds[worst] * scale:.2e}"
        extra = f"worst/bound {ratios[worst]:.2f}"
        return self.add(section, check, "PASS" if ok else "FAIL", shown, bound,
                        f"{extra}; {details}" if details else extra, seconds)

    @contextlib.contextmanager
    def guard(self, section: str, check: str):
        """An exception inside the block becomes a FAIL row (the message and where it was
        raised) instead of ending the run, so one broken case does not hide the others."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:
            traceback.print_exc()
            last = traceback.extract_tb(e.__traceback__)[-1]
            self.add(section, check, "FAIL", f"{type(e).__name__}: {e}"[:300],
                     details=f"raised at {Path(last.filename).name}:{last.lineno}", seconds=time.perf_counter() - t0)

    def failed(self) -> bool:
        return any(r.status == "FAIL" for r in self.rows)

    def counts(self) -> Counter:
        return Counter(r.status for r in self.rows)


def render_table(report: Report, title: str) -> str:
    """The one table: every row of every section, then a one-line summary."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"## {title}", "",
             "| section | check | status | measured | bound | details | s |",
             "|---|---|---|---|---|---|---:|"]
    for r in report.rows:
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append("| " + " | ".join(cell(x) for x in (r.section, r.check, r.status, r.measured, r.bound,
                                                           r.details, secs)) + " |")
    counts = report.counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in ("PASS", "FAIL", "WARN", "SKIP", "INFO") if counts[s])
    lines += ["", f"Result: {'FAILED' if report.failed() else 'passed'} ({summary})."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ utilities
@dataclass
class Setup:
    """What every section needs to know about this run."""

    dry_run: bool
    device: Any  # torch.device
    capability: tuple[int, int] | None
    interpret: bool  # triton's CPU interpreter is on (dry runs with triton installed)
    triton_installed: bool


def dtype_of(tag: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[tag]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_max(a, b) -> float:
    """max |a - b| / max |b| in float64 (the flashconv tests' measure)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def rel_norm(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the h3_core tests' measure)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@contextlib.contextmanager
def record_paths(counter: Counter):
    """Count every `select_impl` decision h3_core makes inside the block (requested -> chosen)."""
    hc = importlib.import_module("hippo.kernels.h3_core")  # the module (hippo.kernels.h3_core is also a function)
    original = hc.select_impl

    def recording(capability, dtype, length, device_type, *, impl="auto", stateful=False, **kw):
        chosen = original(capability, dtype, length, device_type, impl=impl, stateful=stateful, **kw)
        tag = {v: k for k, v in {"fp32": "torch.float32", "fp16": "torch.float16",
                                 "bf16": "torch.bfloat16"}.items()}.get(str(dtype), str(dtype))
        counter[f"{impl}->{chosen} ({device_type} {tag} L={length}{' +state' if stateful else ''})"] += 1
        return chosen

    hc.select_impl = recording
    try:
        yield counter
    finally:
        hc.select_impl = original


def paths_text(counter: Counter) -> str:
    return "; ".join(f"{k} x{v}" for k, v in sorted(counter.items())) or "no h3_core call"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- env section
def section_env(report: Report, setup: Setup, hippo_source: str, yaml_source: str, st_source: str) -> None:
    import torch

    from hippo.parallel.runtime import detected_peak_flops

    report.add("env", "python / torch", "INFO", f"{platform.python_version()} / {torch.__version__}",
               details=f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build")
    if setup.triton_installed:
        import triton

        from hippo.kernels._flashconv_triton import FP32_DOT_PRECISION

        report.add("env", "triton", "INFO", triton.__version__,
                   details=f"fp32 dots {FP32_DOT_PRECISION}" + ("; TRITON_INTERPRET=1 (CPU interpreter)"
                                                               if setup.interpret else ""))
    else:
        report.add("env", "triton", "SKIP", "not installed", details="h3_core 'auto' uses the chunked path")
    if setup.device.type == "cuda":
        cap = setup.capability
        peak = detected_peak_flops()
        report.add("env", "device", "INFO", torch.cuda.get_device_name(setup.device),
                   details=f"sm_{cap[0]}{cap[1]}, {torch.cuda.get_device_properties(setup.device).total_memory / 2**30:.0f} GiB, "
                           f"peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else f"sm_{cap[0]}{cap[1]}, peak FLOP/s unknown")
    else:
        report.add("env", "device", "INFO", "cpu (dry run)", details=f"{os.cpu_count()} cores, {torch.get_num_threads()} threads")
    report.add("env", "fp32 matmul precision", "INFO", torch.get_float32_matmul_precision(),
               details="set to 'highest' (no TF32) so fp32 references and checks are fp32")
    source, _, why = hippo_source.partition(" (")
    report.add("env", "hippo import", "INFO", source, details=why.rstrip(")"))
    report.add("env", "configs / checkpoints", "INFO", yaml_source, details=st_source)


def section_imports(report: Report) -> None:
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN_MODULES))
    report.add("imports", "no deepspeed / megatron / mlflow / webdataset", "FAIL" if loaded else "PASS",
               ", ".join(loaded) if loaded else "none loaded")


# ------------------------------------------------------------------------ configs section
def expected_parameters(cfg) -> int:
    """Closed form of HippoLM's parameter count (tied head once). H3 layer: 4 d^2 + (5 N + 7) d
    (tests/models/test_lm.py states 4 d^2 + 327 d for N = 64)."""
    d, N, r = cfg.d_model, cfg.d_state, cfg.mlp_ratio
    mixer = {"h3": 4 * d * d + (5 * N + 7) * d, "attention": 4 * d * d + 4 * d}
    layer = {kind: mixer[kind] + 4 * d + 2 * r * d * d + (r + 1) * d for kind in mixer}
    n = cfg.padded_vocab_size * d + 2 * d + sum(layer[k] for k in cfg.layer_mixers)
    if cfg.position_embedding == "learned":
        n += cfg.max_position_embeddings * d
    return n


def section_configs(report: Report, setup: Setup) -> None:
    import torch

    from hippo.pretrain.models import HippoLM, count_parameters

    for name in MODELS_125M:
        t0 = time.perf_counter()
        cfg = load_model_config(name)
        with torch.device("meta"):
            model = HippoLM(cfg, init=False)
        n = sum(p.numel() for p in model.parameters())
        problems = []
        if n != expected_parameters(cfg) or n != count_parameters(cfg):
            problems.append(f"count {n} != closed form {expected_parameters(cfg)}")
        if tuple(model.embedding.word.weight.shape) != (cfg.padded_vocab_size, cfg.d_model):
            problems.append(f"embedding {tuple(model.embedding.word.weight.shape)}")
        kinds = [type(b.mixer).__name__ for b in model.layers.values()]
        want = [{"h3": "H3", "attention": "CausalSelfAttention", "s4d": "S4D"}[k] for k in cfg.layer_mixers]
        if kinds != want:
            problems.append(f"mixers {kinds} != {want}")
        attn = [i for i, k in enumerate(cfg.layer_mixers) if k == "attention"]
        report.add("configs", f"{name} on meta", "FAIL" if problems else "PASS", f"{n / 1e6:.1f}M parameters",
                   f"= {expected_parameters(cfg) / 1e6:.1f}M closed form",
                   "; ".join(problems) or f"d {cfg.d_model}, {cfg.n_layer} layers, attention at {attn or 'none'}, "
                                          f"vocab {cfg.padded_vocab_size}", time.perf_counter() - t0)


# ------------------------------------------------------------------------ kernels section
def _h3_inputs(tag: str, B: int, C: int, L: int, seed: int = 0):
    """The inputs of tests/kernels/test_flashconv_triton.py::h3_case (CPU generator)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    N, dt = 64, dtype_of(tag)
    q, k, v, dy = (rnd(B, C, L).to(dt) for _ in range(4))
    sB, sC, sD = rnd(C, N) / 8, rnd(C, N) / N**0.5, rnd(C)
    log_dt = torch.empty(C).uniform_(-6.9, -2.3, generator=g)
    log_A, A_im = torch.full((C, 32), -0.69), torch.pi * torch.arange(32.0).expand(C, 32).clone()
    B_, C_, D = rnd(C, 32, 2), rnd(C, 32, 2) / 2**0.5, rnd(C)
    return (q, k, v, dy), (sB, sC, sD, D, log_dt, C_), (log_A, A_im, B_)


def h3_core_errors(device, tag: str, B: int, C: int, L: int, impl: str, grads: bool = True,
                   paths: Counter | None = None) -> dict[str, float]:
    """h3_core(impl) with q k v dy in `tag`, SSM parameters fp32, against h3_core_ref in float64
    on the same values: normwise errors of y and (grads) every SSM-parameter gradient."""
    import torch

    from hippo.kernels import DiscreteDiagonalSSM, discretize_diagonal, h3_core, h3_core_ref

    (q, k, v, dy), params, (log_A, A_im, B_) = _h3_inputs(tag, B, C, L)
    outs = {}
    for which, pdt, xdt in ((impl, torch.float32, dtype_of(tag)), ("ref", torch.float64, torch.float64)):
        x = [t.to(device=device, dtype=xdt) for t in (q, k, v)]
        p = [t.to(device=device, dtype=pdt).requires_grad_(grads) for t in params]
        sB, sC, sD, D, log_dt, C_ = p
        ssm = discretize_diagonal(log_dt, log_A.to(device, pdt), A_im.to(device, pdt), B_.to(device, pdt), C_)
        if which == "ref":
            ssm = DiscreteDiagonalSSM(*(t.to(torch.complex128) for t in ssm))
            y = h3_core_ref(*x, sB, sC, sD, ssm, D)
        else:
            with record_paths(paths if paths is not None else Counter()):
                y = h3_core(*x, sB, sC, sD, ssm, D, impl=impl)
            if y.dtype != dtype_of(tag):
                raise AssertionError(f"h3_core returned {y.dtype} for {tag} inputs")
        g = torch.autograd.grad(y, p, dy.to(device=device, dtype=y.dtype)) if grads else ()
        outs[which] = (y.detach(), g)
    names = ("dshift_B", "dshift_C", "dshift_D", "dD", "dlog_dt", "dC")
    errs = {"y": rel_norm(outs[impl][0], outs["ref"][0])}
    errs.update({n: rel_norm(a, b) for n, a, b in zip(names, outs[impl][1], outs["ref"][1])})
    return errs


def h3_core_bounds(tag: str, L: int, quantities) -> dict[str, float]:
    from hippo.kernels._flashconv_support import block_fft_config

    n2 = block_fft_config(L)[2]
    return {q: h3_bound(tag, ROUNDINGS["y" if q == "y" else "grad"], n2, L) for q in quantities}


def flashconv_errors(device, tag: str, B: int, C: int, L: int, seed: int = 0) -> dict[str, float]:
    """tests/kernels/test_flashconv_triton.py::conv_case(with_vq=True, grads=True) on `device`:
    y = q (conv(u v, k) + D u v) and all five input gradients against float64 on the same
    dtype-rounded inputs, max-norm relative errors."""
    import torch

    from hippo.kernels._flashconv_triton import flashconv
    from hippo.kernels.fftconv import fftconv

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dt = dtype_of(tag)
    u, v, q, dy = rnd(B, C, L), rnd(B, C, L), rnd(B, C, L), rnd(B, C, L)
    k, D = rnd(C, L) / L**0.5, rnd(C)
    leaves = {n: t.to(dt).double().to(device) for n, t in dict(u=u, k=k, D=D, v=v, q=q).items()}
    ins = {n: t.to(dt).requires_grad_() for n, t in leaves.items()}
    y = flashconv(ins["u"], ins["k"], ins["D"], v=ins["v"], q=ins["q"])
    if y.dtype != dt:
        raise AssertionError(f"flashconv returned {y.dtype} for {tag} inputs")
    ref = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    y_ref = ref["q"] * fftconv(ref["u"] * ref["v"], ref["k"], ref["D"])
    names = list(ins)
    dy = dy.to(device)
    got = torch.autograd.grad(y, [ins[n] for n in names], dy.to(dt))
    want = torch.autograd.grad(y_ref, [ref[n] for n in names], dy.to(dt).double())
    errs = {"y": rel_max(y.detach(), y_ref.detach())}
    errs.update({f"d{n}": rel_max(a, b) for n, a, b in zip(names, got, want)})
    return errs


def kernel_plan(setup: Setup) -> list[tuple[str, int, str, str]]:
    """(dtype tag, L, path, why) rows: path "triton" / "torch" (what 'auto' falls back to)."""
    from hippo.kernels.h3_core import select_impl, triton_unsupported

    plan = []
    if setup.dry_run:
        # Triton only under the interpreter (explicit impl="triton"); 'auto' on CPU is chunked.
        if setup.interpret:
            plan += [(tag, 256, "triton", "TRITON_INTERPRET=1, GPU rounding emulated") for tag in DTYPE_TAGS]
        plan += [("fp32", L, "torch", "auto on cpu") for L in (256, 1024)]
        return plan
    for tag in DTYPE_TAGS:
        for L in KERNEL_LENGTHS:
            facts = dict(triton_installed=setup.triton_installed)
            chosen = select_impl(setup.capability, dtype_of(tag), L, "cuda", **facts)
            why = triton_unsupported(setup.capability, dtype_of(tag), L, "cuda", **facts) or "auto picks triton"
            plan.append((tag, L, chosen, why))
    return plan


def section_kernels(report: Report, setup: Setup) -> None:
    from hippo.kernels import TritonUnavailableError

    dev = setup.device
    B, C = (1, 2) if setup.dry_run else (2, 16)
    for tag, L, path, why in kernel_plan(setup):
        if path == "triton":
            check = f"flashconv {tag} L={L} fwd+bwd"
            with report.guard("kernels", check):
                errs, secs = timed(lambda: flashconv_errors(dev, tag, B, C, L))
                report.bounded("kernels", check, errs, TOL[tag], f"max-norm vs float64, B={B} C={C}; {why}", secs)
            check, paths = f"h3_core triton {tag} L={L} fwd+bwd", Counter()
            with report.guard("kernels", check):
                errs, secs = timed(lambda: h3_core_errors(dev, tag, B, C, L, "triton", paths=paths))
                report.bounded("kernels", check, errs, h3_core_bounds(tag, L, errs),
                               f"normwise vs float64 h3_core_ref; {paths_text(paths)}", secs)
        elif tag == "fp32":
            check, paths = f"h3_core auto {tag} L={L} fwd", Counter()
            with report.guard("kernels", check):
                errs, secs = timed(lambda: h3_core_errors(dev, tag, B, C, L, "auto", grads=False, paths=paths))
                report.bounded("kernels", check, errs, CHUNKED_TOL, f"{paths_text(paths)}; {why}", secs)
        else:
            report.add("kernels", f"h3_core {tag} L={L}", "SKIP", details=f"auto picks {path}: {why}")
    # An explicit impl="triton" outside the supported lengths is refused before any work.
    t0 = time.perf_counter()
    try:
        h3_core_errors(dev, "fp32", 1, 2, 4096, "triton", grads=False)
        report.add("kernels", "impl='triton' refuses fp32 L=4096", "FAIL", "ran", details="expected TritonUnavailableError")
    except TritonUnavailableError as e:
        report.add("kernels", "impl='triton' refuses fp32 L=4096", "PASS", "TritonUnavailableError",
                   details=e.reason, seconds=time.perf_counter() - t0)


# -------------------------------------------------------------------------- layer section
def layer_fp32_ratio(device, d: int, L: int, paths: Counter) -> tuple[float, str]:
    """tests/kernels/test_h3_core.py::test_h3_module_routes_through_selectable_impl at (d, L):
    max over y, du, dlog_dt, dshift_B of |auto - ref| / (atol + rtol |ref|) (<= 1 passes)."""
    import torch

    from hippo.pretrain.models import H3

    torch.manual_seed(0)
    layer = H3(d, 64, layer_idx=0).to(device)
    u = torch.randn(2, L, d, device=device, requires_grad=True)
    outs = {}
    for impl in ("auto", "reference"):
        layer.conv_impl = impl
        layer.zero_grad()
        u.grad = None
        with record_paths(paths if impl == "auto" else Counter()):
            y = layer(u)
        y.square().sum().backward()
        outs[impl] = (y.detach(), u.grad.clone(), layer.diag_ssm.log_dt.grad.clone(), layer.shift_ssm.B.grad.clone())
    names = ("y", "du", "dlog_dt", "dshift_B")
    ratios = {n: float(((a - b).abs() / (LAYER_ATOL + LAYER_RTOL * b.abs())).max())
              for n, a, b in zip(names, outs["auto"], outs["reference"])}
    worst = max(ratios, key=ratios.get)
    return ratios[worst], worst


def layer_bf16_error(device, d: int, L: int, paths: Counter) -> float:
    """y of the layer under bf16 autocast (conv_impl auto) against the fp32 reference layer."""
    import torch

    from hippo.pretrain.models import H3

    torch.manual_seed(0)
    layer = H3(d, 64, layer_idx=0).to(device)
    u = torch.randn(2, L, d, device=device)
    with torch.no_grad():
        layer.conv_impl = "auto"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16), record_paths(paths):
            y = layer(u)
        layer.conv_impl = "reference"
        y_ref = layer(u)
    return rel_norm(y.float(), y_ref)


def section_layer(report: Report, setup: Setup) -> None:
    from hippo.kernels._flashconv_support import block_fft_config

    dev = setup.device
    for L in ((300,) if setup.dry_run else (300, 2048, 4096)):
        check, paths = f"H3 auto vs reference fp32 d=32 L={L}", Counter()
        with report.guard("layer", check):
            (ratio, worst), secs = timed(lambda: layer_fp32_ratio(dev, 32, L, paths))
            scale = report.tolerance_scale
            ok = math.isfinite(ratio) and ratio <= scale
            report.add("layer", check, "PASS" if ok else "FAIL", f"{worst} {ratio:.2f} of tolerance",
                       f"rtol {LAYER_RTOL * scale:.0e}, atol {LAYER_ATOL * scale:.0e}",
                       f"y, du, dlog_dt, dshift_B; {paths_text(paths)}", secs)
    d, L = (64, 256) if setup.dry_run else (768, 2048)
    check, paths = f"H3 auto bf16 autocast vs reference fp32 d={d} L={L} fwd", Counter()
    with report.guard("layer", check):
        err, secs = timed(lambda: layer_bf16_error(dev, d, L, paths))
        bound = h3_bound("bf16", LAYER_BF16_ROUNDINGS, block_fft_config(L)[2], L)
        report.bounded("layer", check, {"y": err}, bound, f"normwise; {paths_text(paths)}", secs)


# -------------------------------------------------------------------------- train section
def parameter_groups(model, lr: float, weight_decay: float, ssm_lr_cap: float) -> list[dict]:
    """The groups of `hippo.pretrain.optim.parameter_groups` (that module imports the run
    config and PyYAML): SSM dynamics (no decay, lr capped), biases and norms (no decay), rest."""
    import torch.nn as nn

    from hippo.pretrain.models.ssm import is_ssm_dynamics

    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    ssm, no_decay, decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (ssm if is_ssm_dynamics(p) else no_decay if id(p) in norm_ids or name.endswith("bias") else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, lr=lr), dict(params=no_decay, weight_decay=0.0, lr=lr),
              dict(params=ssm, weight_decay=0.0, lr=min(ssm_lr_cap, lr))]
    return [g for g in groups if g["params"]]


def synthetic_batch(gen, batch: int, seq_len: int, vocab: int):
    """Learnable synthetic tokens: i.i.d. from a Zipf law (exponent 1.2) over the first
    min(vocab, 1024) ids, so the loss can fall from ~ln(vocab) (10.8 for the GPT-2 vocabulary,
    5.5 for the byte one) towards the law's entropy (4.2 and 3.7 nats) within a few steps."""
    import torch

    active = min(vocab, 1024)
    probs = 1.0 / (torch.arange(active, dtype=torch.float64) + 1.0) ** 1.2
    ids = torch.multinomial(probs.float(), batch * (seq_len + 1), replacement=True, generator=gen)
    ids = ids.view(batch, seq_len + 1)
    return ids[:, :-1], ids[:, 1:]


@dataclass
class TrainResult:
    losses: list[float]
    grad_norms: list[float]
    tokens_per_s: float
    timed_steps: int
    peak_mem_bytes: int | None
    paths: Counter


def train_steps(model, device, *, steps: int, batch: int, seq_len: int, vocab: int, optim: dict,
                warmup_steps: int = 3, timing_from: int = 5) -> TrainResult:
    """The plain loop: AdamW (three groups), linear warmup then constant lr, bf16 autocast,
    global-norm clipping; tokens/s over steps >= timing_from (after compiles and warm-up)."""
    import torch

    lr = float(optim.get("lr", 6e-4))
    betas = tuple(optim.get("betas", (0.9, 0.999)))
    clip = float(optim.get("grad_clip", 1.0))
    opt = torch.optim.AdamW(parameter_groups(model, lr, float(optim.get("weight_decay", 0.1)),
                                             float(optim.get("ssm_lr_cap", 1e-3))),
                            lr=lr, betas=betas, eps=float(optim.get("eps", 1e-8)))
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, norms, paths = [], [], Counter()
    timing_from = min(timing_from, steps - 1)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = None
    with record_paths(paths):
        for step in range(steps):
            if step == timing_from:
                sync(device)
                t_start = time.perf_counter()
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * min(1.0, (step + 1) / warmup_steps)
            x, y = (t.to(device, non_blocking=True) for t in synthetic_batch(gen, batch, seq_len, vocab))
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = model.loss(x, y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.zeros(())
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # one host sync per step, as the trainer does
            norms.append(float(norm))
    sync(device)
    elapsed = time.perf_counter() - t_start
    timed_steps = steps - timing_from
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return TrainResult(losses, norms, timed_steps * batch * seq_len / elapsed, timed_steps, peak, paths)


def loss_falls(losses: list[float], margin: float = 0.5) -> tuple[bool, str]:
    """All finite and the mean of the last 5 at least `margin` nats below the first."""
    tail = losses[-5:]
    finite = all(math.isfinite(x) for x in losses)
    last = sum(tail) / len(tail)
    return finite and last <= losses[0] - margin, f"{losses[0]:.3f} -> {last:.3f} (mean of last {len(tail)})"


def section_train(report: Report, setup: Setup) -> None:
    import torch

    from hippo.parallel.runtime import detected_peak_flops
    from hippo.pretrain.flops import train_flops_per_token
    from hippo.pretrain.models import HippoLM

    dev = setup.device
    if setup.dry_run:  # tiny_hybrid (the CPU quick-start model) at half width and depth
        name, steps, seq_len, batch = "tiny_hybrid", 10, 64, 4
        cfg = load_model_config(name, d_model=64, n_layer=2)
        label = f"{name} (d_model 64, 2 layers)"
    else:
        name, steps, seq_len = "hybrid_125m", 30, 2048
        batch = int(load_run_yaml(name).get("train", {}).get("micro_batch_size", 8))
        cfg = load_model_config(name)
        label = name
    run = load_run_yaml(name)
    torch.manual_seed(0)
    model = HippoLM(cfg).to(dev)
    res, secs = timed(lambda: train_steps(model, dev, steps=steps, batch=batch, seq_len=seq_len,
                                          vocab=cfg.vocab_size, optim=run.get("optim", {})))
    shape = f"{label}, {steps} steps, batch {batch} x L {seq_len}, bf16 autocast"
    ok, text = loss_falls(res.losses)
    report.add("train", "loss falls", "PASS" if ok else "FAIL", text, "last <= first - 0.5, all finite",
               f"{shape}; grad norm {res.grad_norms[0]:.2f} -> {res.grad_norms[-1]:.2f}", secs)
    flops = train_flops_per_token(cfg, seq_len)
    report.add("train", "tokens/s", "INFO", f"{res.tokens_per_s:,.0f}",
               details=f"steps {steps - res.timed_steps}..{steps - 1}; {flops / 1e6:,.1f} MFLOP/token (train_flops_per_token)")
    peak = detected_peak_flops()
    if peak:
        report.add("train", "MFU", "INFO", f"{100 * res.tokens_per_s * flops / peak:.1f}%",
                   details=f"of {peak / 1e12:.0f} TFLOP/s dense bf16 ({torch.cuda.get_device_name(dev)})")
    else:
        report.add("train", "MFU", "SKIP", details="no peak FLOP/s for this device (PEAK_BF16_FLOPS)")
    if res.peak_mem_bytes is not None:
        report.add("train", "peak memory", "INFO", f"{res.peak_mem_bytes / 2**30:.2f} GiB",
                   details="torch.cuda.max_memory_allocated over the steps (weights, AdamW state, activations)")
    report.add("train", "kernel paths", "INFO", details=paths_text(res.paths) + "; attention: torch SDPA")
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------- generate section
@dataclass
class GenResult:
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    paths: Counter


def generation_speed(model, device, *, batch: int, prompt_len: int, new: int, vocab: int) -> GenResult:
    """Greedy recurrent decoding as `hippo.pretrain.models.generation.generate` does it (prefill
    with last_only, then one token per step), with the prefill and the steps timed apart."""
    import torch

    from hippo.pretrain.models import InferenceParams
    from hippo.pretrain.models.generation import SamplingConfig, sample_next

    greedy = SamplingConfig(greedy=True)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    paths = Counter()

    def run(p, n):
        params = InferenceParams(max_seqlen=p.shape[1] + n, max_batch_size=p.shape[0])
        sync(device)
        t0 = time.perf_counter()
        logits = model(p, params, last_only=True)[:, -1]
        sync(device)
        t1 = time.perf_counter()
        tokens = []
        for i in range(n):
            logits[:, vocab:] = float("-inf")  # padded vocabulary entries, as generate() masks them
            token = sample_next(logits, greedy)
            tokens.append(token)
            params.seqlen_offset = p.shape[1] + i
            logits = model(token.unsqueeze(1), params)[:, -1]
        sync(device)
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits while decoding")
        return t1 - t0, time.perf_counter() - t1

    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        run(prompt[:, : min(64, prompt_len)], 2)  # warm-up: cuBLAS handles, kernel compiles
        with record_paths(paths):
            prefill_s, decode_s = run(prompt, new)
    return GenResult(prefill_s, decode_s, batch * new / decode_s, paths)


def recurrent_error(model, device, *, batch: int, prompt_len: int, steps: int, vocab: int) -> float:
    """max |stepped - full| / max |full| of the logits: prefill + one token per step against one
    full forward pass over the same ids, fp32, H3 layers on the chunked path."""
    import torch

    from hippo.pretrain.models import H3, InferenceParams

    for m in model.modules():
        if isinstance(m, H3):
            m.conv_impl = "chunked"
    ids = torch.randint(0, vocab, (batch, prompt_len + steps), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full = model(ids)[:, prompt_len - 1:]
        params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=batch)
        out = [model(ids[:, :prompt_len], params, last_only=True)]
        for t in range(prompt_len, ids.shape[1]):
            params.seqlen_offset = t
            out.append(model(ids[:, t: t + 1], params))
        stepped = torch.cat(out, dim=1)
    for m in model.modules():
        if isinstance(m, H3):
            m.conv_impl = "auto"
    return float((stepped - full).abs().max() / full.abs().max())


def section_generate(report: Report, setup: Setup) -> None:
    import torch

    from hippo.pretrain.models import HippoLM

    dev = setup.device
    if setup.dry_run:
        shape = dict(batch=2, prompt_len=48, new=4)
        check = dict(batch=1, prompt_len=40, steps=3)
        shrink = dict(d_model=64, n_head=4, vocab_size=1000)
    else:
        shape = dict(batch=64, prompt_len=1536, new=128)
        check = dict(batch=2, prompt_len=1536, steps=8)
        shrink = {}
    for name in MODELS_125M:
        cfg = load_model_config(name, **shrink)
        label = name + (" (d_model 64, vocab 1000)" if shrink else "")
        torch.manual_seed(0)
        model = HippoLM(cfg).to(dev).eval()
        title = f"{label} batch {shape['batch']}, prompt {shape['prompt_len']}, {shape['new']} new"
        with report.guard("generate", title):
            res, secs = timed(lambda: generation_speed(model, dev, vocab=cfg.vocab_size, **shape))
            report.add("generate", title, "INFO", f"{res.tokens_per_s:,.0f} tok/s decode; prefill {res.prefill_s:.2f} s",
                       details=f"decode {res.decode_s:.2f} s, greedy, bf16 autocast; {paths_text(res.paths)}",
                       seconds=secs)
        title = f"{label} recurrent == full pass"
        with report.guard("generate", title):
            err, secs = timed(lambda: recurrent_error(model, dev, vocab=cfg.vocab_size, **check))
            report.bounded("generate", title, {"logits": err}, RECURRENT_TOL,
                           f"fp32, batch {check['batch']}, prompt {check['prompt_len']} + {check['steps']} steps, "
                           f"max-norm relative", secs)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="where to write the table (default benchmarks/results/gpu_check.md, "
                                  "or gpu_check_dry_run.md with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU / meta device with tiny shapes: checks the script itself, not the GPU")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--tolerance-scale", type=float, default=1.0,
                    help="multiply every numeric bound (0 makes every bounded check fail: tests the exit code)")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad:
        ap.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.perf_counter()
    triton_installed = importlib.util.find_spec("triton") is not None
    if args.dry_run and triton_installed:
        # Before anything imports triton: the kernels then run under its CPU interpreter.
        os.environ["TRITON_INTERPRET"] = "1"
    hippo_source = ensure_hippo()
    st_source = ensure_safetensors()
    yaml_source = read_yaml(REPO / "configs" / "hybrid_125m.yaml")[1]

    import torch

    torch.set_float32_matmul_precision("highest")  # fp32 checks must not run on TF32
    if args.dry_run:
        device, capability = torch.device("cpu"), None
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        capability = torch.cuda.get_device_capability(device)
    else:
        print("gpu_check: no CUDA device visible; run with --dry-run for the CPU check of this script",
              file=sys.stderr)
        return 2
    setup = Setup(dry_run=args.dry_run, device=device, capability=capability,
                  interpret=os.environ.get("TRITON_INTERPRET", "0") == "1", triton_installed=triton_installed)
    report = Report(args.tolerance_scale)
    sections = {
        "env": lambda: section_env(report, setup, hippo_source, yaml_source, st_source),
        "configs": lambda: section_configs(report, setup),
        "kernels": lambda: section_kernels(report, setup),
        "layer": lambda: section_layer(report, setup),
        "train": lambda: section_train(report, setup),
        "generate": lambda: section_generate(report, setup),
    }
    section_seconds = {}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        t0 = time.perf_counter()
        with report.guard(name, "section raised"):  # the other sections still run
            sections[name]()
        section_seconds[name] = time.perf_counter() - t0
    section_imports(report)
    total = time.perf_counter() - t_begin
    per_section = ", ".join(f"{n} {s:.1f} s" for n, s in section_seconds.items())
    if args.dry_run:
        report.add("time", "total wall time", "INFO", f"{total:.1f} s", details=f"dry run (CPU); {per_section}")
    else:
        report.add("time", "total wall time", "PASS" if total <= TIME_TARGET_S else "WARN", f"{total:.1f} s",
                   f"target {TIME_TARGET_S:.0f} s", f"{per_section}; WARN does not change the exit status")
    mode = "dry run on CPU (not a GPU result)" if args.dry_run else f"{torch.cuda.get_device_name(device)}"
    table = render_table(report, f"GPU acceptance check: {mode}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("\n" + table)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        "gpu_check_dry_run.md" if args.dry_run else "gpu_check.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
