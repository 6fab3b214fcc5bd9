"""The GPU performance table, every figure through the production path (`benchmarks/gpu/run.sh`).

    python benchmarks/gpu/perf_table.py OUT_DIR [--dry-run]

Rows, each measured side by side in this one run:
  env        device, torch, triton, the peak bf16 FLOP/s MFU is taken against
  train      `hippo train {h3,hybrid,transformer}_125m` at seq_len 2048, bf16, ZeRO-1, micro-batch 8:
             the engine's own step timing from metrics.jsonl (median after the warm-up steps),
             tokens/s, MFU, peak device memory, and the kernel path `select_impl` logged
  flashconv  Triton FlashConv (bf16) against torch's FFT convolution (`fftconv`, fp32 compute) at
             L = 1K ... 8K, forward + backward, B = 4, C = 768
  layer      the H3 layer against causal SDPA attention (12 heads), d = 768, fwd + bwd under bf16
             autocast, 16K tokens per call (B = 16K / L), L = 1K ... 16K
  generate   hybrid_125m vs transformer_125m: batch 64, prompt 1536, 128 new tokens, greedy,
             bf16 autocast: prefill seconds and decode tokens/s
The table goes to OUT_DIR/perf.md and stdout. `--dry-run` runs every row on the CPU at tiny
shapes (the Triton kernel interpreted): it proves the script, not the numbers. Exit status 1 if a
row raised (the row says why); the numbers themselves have no pass/fail here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MODELS = ("h3_125m", "hybrid_125m", "transformer_125m")
_TINY = ["model.vocab_size=257", "model.d_model=32", "model.n_layer=2", "model.n_head=4"]
DRY_SHRINK = {"h3_125m": _TINY, "hybrid_125m": [*_TINY, "model.attn_layer_idx=[1]"], "transformer_125m": _TINY}


class Sizes:
    """The GPU's sizes, or the dry run's."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.seq_len = 64 if dry else 2048
        self.train_steps, self.warmup = (4, 2) if dry else (30, 10)
        self.micro = 2 if dry else 8
        self.conv_lengths = (256,) if dry else (1024, 2048, 4096, 8192)
        self.conv_bc = (1, 4) if dry else (4, 768)
        self.layer_lengths = (64, 128) if dry else (1024, 2048, 4096, 8192, 16384)
        self.layer_d, self.layer_heads, self.layer_tokens = (32, 4, 256) if dry else (768, 12, 16384)
        self.gen = (2, 16, 4) if dry else (64, 1536, 128)  # batch, prompt, new tokens
        self.repeats = 2 if dry else 5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------- rows
def env_rows(s: Sizes) -> list[str]:
    from hippo.parallel.runtime import detected_peak_flops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if s.device.type == "cuda" else "CPU (dry run)"
    return [f"| env | {name} | torch {torch.__version__}, triton {triton_version}, Python {sys.version.split()[0]}, "
            f"peak bf16 {detected_peak_flops() / 1e12:.0f} TFLOP/s |"]


def prepare_corpus(root: Path, s: Sizes) -> Path:
    from tests.helpers import text_document

    rng = random.Random(0)
    docs = 600 if s.dry else 6000
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": text_document(rng)}) + "\n" for _ in range(docs)))
    hippo_cli("data", "prepare", str(root / "docs.jsonl"), "-o", str(root / "data"), "--seq-len", str(s.seq_len))
    return root / "data"


def hippo_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "hippo.pretrain.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"hippo {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout)[-1500:]}")
    return proc.stdout + proc.stderr


def train_rows(s: Sizes, root: Path) -> list[str]:
    data = prepare_corpus(root, s)
    rows = []
    for name in MODELS:
        run = root / name
        sets = [*(DRY_SHRINK[name] if s.dry else []), f"train.seq_len={s.seq_len}", f"train.steps={s.train_steps}",
                f"train.micro_batch_size={s.micro}", f"train.global_batch_size={s.micro}", "train.precision=bf16",
                "parallel.zero_stage=1", "train.log_interval=1", f"train.eval_interval={s.train_steps}",
                "train.eval_batches=1", f"checkpoint.interval={s.train_steps}", "tracking.enabled=false",
                f"data.paths=[{data}]"]
        out = hippo_cli("train", name, "--run-dir", str(run), *(a for v in sets for a in ("--set", v)))
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in recs if "tokens_per_s" in r and r["step"] > s.warmup]
        tps = statistics.median(r["tokens_per_s"] for r in timed)
        mfu = [r["mfu"] for r in timed if "mfu" in r]
        mem = max((r.get("max_memory_gib", 0.0) for r in recs), default=0.0)
        paths = sorted(set(re.findall(r"picked '(\w+)'", out))) or ["-"]
        rows.append(f"| train {name} | {tps:,.0f} tok/s | MFU {100 * statistics.median(mfu):.1f}% " if mfu else
                    f"| train {name} | {tps:,.0f} tok/s | MFU n/a ")
        rows[-1] += f"(steps {s.warmup + 1}-{s.train_steps}), peak {mem:.1f} GiB, H3 path {', '.join(paths)} |"
    return rows


def flashconv_rows(s: Sizes) -> list[str]:
    from hippo.kernels import fftconv
    from hippo.kernels._flashconv_triton import flashconv

    rows = []
    B, C = s.conv_bc
    for L in s.conv_lengths:
        g = torch.Generator().manual_seed(L)
        u = torch.randn(B, C, L, generator=g).to(s.device)
        k = (torch.randn(C, L, generator=g) / L**0.5).to(s.device)
        D = torch.randn(C, generator=g).to(s.device)
        ub = u.bfloat16().requires_grad_()
        uf = u.clone().requires_grad_()

        def triton_step():
            flashconv(ub, k, D).float().sum().backward()

        def torch_step():
            fftconv(uf, k, D).sum().backward()

        t_triton = median_ms(triton_step, s.device, s.repeats)
        t_torch = median_ms(torch_step, s.device, s.repeats)
        rows.append(f"| flashconv L={L} | Triton bf16 {t_triton:.3f} ms | torch FFT fp32 {t_torch:.3f} ms: "
                    f"{t_torch / t_triton:.2f}x (fwd+bwd, B={B}, C={C}) |")
    return rows


def layer_rows(s: Sizes) -> list[str]:
    from hippo.pretrain.models import H3
    from hippo.pretrain.models.attention import CausalSelfAttention

    torch.manual_seed(0)
    d = s.layer_d
    h3 = H3(d, 64, layer_idx=0).to(s.device)
    attn = CausalSelfAttention(d, s.layer_heads, layer_idx=1).to(s.device)
    rows = []
    for L in s.layer_lengths:
        B = max(1, s.layer_tokens // L)
        u = torch.randn(B, L, d, device=s.device, requires_grad=True)

        def step(layer):
            def run():
                with torch.autocast(s.device.type, dtype=torch.bfloat16):
                    y = layer(u)
                y.float().square().mean().backward()
            return run

        t_h3 = median_ms(step(h3), s.device, s.repeats)
        t_attn = median_ms(step(attn), s.device, s.repeats)
        rows.append(f"| layer L={L} | H3 {t_h3:.2f} ms | SDPA attention {t_attn:.2f} ms: {t_attn / t_h3:.2f}x "
                    f"(fwd+bwd, B={B}, d={d}, bf16 autocast) |")
    return rows


def generate_rows(s: Sizes) -> list[str]:
    """Prefill and decode timed apart (bench_generation's two phases), each between device syncs."""
    from benchmarks.bench_generation import decode, prefill
    from hippo.pretrain.config import load_config
    from hippo.pretrain.models import HippoLM

    batch, prompt_len, new = s.gen
    rows = []
    for name in ("hybrid_125m", "transformer_125m"):
        torch.manual_seed(0)
        cfg = load_config(name, DRY_SHRINK[name] if s.dry else []).model
        model = HippoLM(cfg).to(s.device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(s.device)
        prefill_s, decode_s = [], []
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            for _ in range(1 + max(1, s.repeats - 2)):  # the first round warms up
                sync(s.device)
                t0 = time.perf_counter()
                _, params, logits = prefill(model, prompt, new)
                sync(s.device)
                t1 = time.perf_counter()
                decode(model, params, logits, prompt_len, new)
                sync(s.device)
                prefill_s.append(t1 - t0)
                decode_s.append(time.perf_counter() - t1)
        t_prefill, t_decode = statistics.median(prefill_s[1:]), statistics.median(decode_s[1:])
        rows.append(f"| generate {name} | prefill {t_prefill:.3f} s | decode {batch * new / t_decode:,.0f} tok/s "
                    f"(batch {batch}, prompt {prompt_len}, {new} new, greedy, bf16 autocast) |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (proves the script only)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("hippo: error: no CUDA device; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    s = Sizes(args.dry_run)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| row | measured | against, and the setting |", "|---|---|---|"]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        sections = [("env", lambda: env_rows(s)), ("train", lambda: train_rows(s, Path(tmp))),
                    ("flashconv", lambda: flashconv_rows(s)), ("layer", lambda: layer_rows(s)),
                    ("generate", lambda: generate_rows(s))]
        for name, fn in sections:
            t0 = time.perf_counter()
            try:
                rows = fn()
            except Exception as e:  # noqa: BLE001 - a row that raised is reported, the others still run
                failed += 1
                traceback.print_exc()
                rows = [f"| {name} | FAILED | {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} |"]
            lines += rows
            print("\n".join(rows), f"\n[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    table = "\n".join(lines) + "\n"
    (args.out_dir / "perf.md").write_text(table)
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # tests.helpers (the corpus generator the tests use)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
