"""H3 layer forward+backward: fast path vs reference path vs a causal SDPA attention layer.

All timings in one process, side by side, median of --repeats; peak memory per (layer, L) from
a fresh subprocess (peak RSS above its post-setup baseline), so allocator caching of one
configuration cannot hide another's. Also reports the fast path's achieved GFLOP/s against this
CPU's measured fp32 matmul peak.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_h3_layer.py --d-model 256 --batch 4 \
        --lengths 512 1024 2048 4096 8192 16384 32768 (paste the printed table into BENCHMARKS.md)

`--curve` instead measures the fast path's cost per token from 1K to 64K (issue 17): H3 fwd+bwd
time / (batch x L) at each L with its ratio to 4K, and H3 against the attention layer at
`--attn-lengths` (1K and 16K), the two layers timed in alternation in the same process:

    .venv/bin/python benchmarks/bench_h3_layer.py --curve --threads 2
    .venv/bin/python benchmarks/bench_h3_layer.py --curve --threads 1 --clock cpu   # shared machine
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


from hippo.pretrain.models import H3
from hippo.pretrain.models.attention import CausalSelfAttention

LAYERS = ("h3_fast", "h3_ref", "attn")


def build(kind: str, d: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "attn":
        return CausalSelfAttention(d, max(d // 64, 1), layer_idx=0)
    layer = H3(d, 64, layer_idx=0)
    layer.conv_impl = "auto" if kind == "h3_fast" else "reference"
    return layer


def fwd_bwd(layer: torch.nn.Module, u: torch.Tensor) -> None:
    layer(u).sum().backward()


def time_fwd_bwd(layer, u, repeats: int) -> float:
    fwd_bwd(layer, u)  # warm-up
    times = []
    for _ in range(repeats):
        layer.zero_grad(set_to_none=True)
        u.grad = None
        t0 = time.perf_counter()
        fwd_bwd(layer, u)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_probe(kind: str, d: int, B: int, L: int) -> None:
    """Runs in a subprocess: prints peak RSS bytes above the baseline of one fwd+bwd."""
    layer = build(kind, d)
    u = torch.randn(B, L, d, requires_grad=True)
    # Warm the library state (thread pools, FFT plans) on a tiny input first.
    fwd_bwd(layer, torch.randn(1, 64, d, requires_grad=True))
    base = _rss()
    fwd_bwd(layer, u)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def peak_memory(kind: str, d: int, B: int, L: int, threads: int) -> int:
    cmd = [sys.executable, __file__, "--probe", kind, "--d-model", str(d), "--batch", str(B),
           "--lengths", str(L), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def h3_fast_flops(B: int, L: int, d: int, P: int = 64, n_modes: int = 32) -> float:
    """Arithmetic the fast path actually performs, fwd+bwd (backward of a matmul = 2 matmuls).

    Per (batch, channel, position), forward: shift bands 2 x 2P, diagonal Toeplitz 2P, to/from
    mode maps 2 x 2 x 2 n_modes, ~4 elementwise; projections 4 x 2 d per position per channel.
    """
    core = 6 * P + 8 * n_modes + 4
    proj = 4 * 2 * d
    return 3.0 * B * L * d * (core + proj)


CURVE_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def _curve_reps(L: int, repeats: int) -> int:
    return repeats if L <= 4096 else max(2, repeats // 2) if L <= 16384 else 2


def cost_curve(args) -> str:
    """Per-token fwd+bwd cost of the H3 fast path over L, and H3 vs attention at a few L.

    Attention is timed only at `--attn-lengths`: its cost grows with L^2 (about 1 min per
    fwd+bwd at 32K on 2 cores), so the longer lengths are H3 only. At the attention lengths the
    two layers alternate repetition by repetition, so both see the same machine load.
    """
    d, B = args.d_model, args.batch
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    h3, attn = build("h3_fast", d), build("attn", d)
    load_before = os.getloadavg()
    rows = []
    for L in args.lengths:
        reps = _curve_reps(L, args.repeats)
        u = torch.randn(B, L, d, requires_grad=True)
        layers = {"h3": h3, "attn": attn} if L in args.attn_lengths else {"h3": h3}
        times = {k: [] for k in layers}
        for layer in layers.values():
            fwd_bwd(layer, u)  # warm-up
        for _ in range(reps):
            for kind, layer in layers.items():
                layer.zero_grad(set_to_none=True)
                u.grad = None
                t0 = clock()
                fwd_bwd(layer, u)
                times[kind].append(clock() - t0)
        r = {"L": L, "reps": reps, **{k: statistics.median(v) for k, v in times.items()},
             **{k + "_min": min(v) for k, v in times.items()}}
        rows.append(r)
        print(r, flush=True)
        del u
    load_after = os.getloadavg()
    per_tok = {r["L"]: r["h3"] / (B * r["L"]) for r in rows}
    ref = per_tok.get(4096)
    lines = [
        f"#### H3 layer fwd+bwd cost per token, batch {B}, d_model {d}, fp32, {args.threads} threads",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; median of `reps`; "
        + ("wall-clock time" if args.clock == "wall" else "process CPU time (all threads)"),
        "",
        "| L | reps | H3 fwd+bwd (ms) | per token (us) | vs 4K | attention (ms) | attention / H3 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        L = r["L"]
        vs = f"{per_tok[L] / ref:.2f}x" if ref else "-"
        at = f"{r['attn'] * 1e3:.0f}" if "attn" in r else "not run"
        ratio = f"{r['attn'] / r['h3']:.2f}x" if "attn" in r else "-"
        lines.append(f"| {L} | {r['reps']} | {r['h3'] * 1e3:.0f} | {per_tok[L] * 1e6:.2f} | {vs} | {at} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-attn-len", type=int, default=16384, help="skip attention above this L")
    ap.add_argument("--max-ref-len", type=int, default=32768)
    ap.add_argument("--max-mem-len", type=int, default=16384, help="skip memory probes above this L")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", choices=LAYERS)
    ap.add_argument("--out")
    ap.add_argument("--curve", action="store_true", help="per-token cost curve of H3 (default lengths 1K..64K)")
    ap.add_argument("--attn-lengths", type=int, nargs="+", default=[1024, 16384],
                    help="with --curve: the lengths where attention is timed alongside")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="with --curve: wall-clock, or process CPU time, which other jobs on a shared "
                         "machine do not inflate (meaningful with --threads 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, B = args.d_model, args.batch
    if args.probe:
        memory_probe(args.probe, d, B, args.lengths[0])
        return
    if args.curve:
        if "--lengths" not in sys.argv:
            args.lengths = CURVE_LENGTHS
        text = cost_curve(args)
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")
        return

    peak = matmul_peak()
    layers = {k: build(k, d) for k in LAYERS}
    rows = []
    for L in args.lengths:
        reps = args.repeats if L <= 4096 else max(1, args.repeats // 2) if L <= 8192 else 1
        u = torch.randn(B, L, d, requires_grad=True)
        r = {"L": L, "reps": reps}
        for kind, layer in layers.items():
            limit = {"attn": args.max_attn_len, "h3_ref": args.max_ref_len}.get(kind, 1 << 30)
            if L > limit:
                continue
            r[kind] = time_fwd_bwd(layer, u, reps)
            if L <= args.max_mem_len:
                r[kind + "_mem"] = peak_memory(kind, d, B, L, args.threads)
        r["gflops"] = h3_fast_flops(B, L, d) / r["h3_fast"] / 1e9
        rows.append(r)
        print(r, flush=True)

    def ms(r, k):
        return f"{r[k] * 1e3:.0f}" if k in r else "not run"

    def ratio(r, a, b):
        return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"

    def mib(r, k):
        return f"{r[k] / 2**20:.0f}" if k in r else "-"

    lines = [
        f"### H3 layer fwd+bwd, batch {B}, d_model {d}, fp32, {args.threads} threads",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; fp32 matmul peak (2048^3) measured in this run: {peak:.0f} GFLOP/s",
        "",
        "| L | reps | H3 fast (ms) | H3 reference (ms) | attention (ms) | fast vs ref | attn / H3 fast "
        "| peak MiB fast | peak MiB ref | peak MiB attn | fast GFLOP/s | % of matmul peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['L']} | {r['reps']} | {ms(r, 'h3_fast')} | {ms(r, 'h3_ref')} | {ms(r, 'attn')} "
            f"| {ratio(r, 'h3_ref', 'h3_fast')} | {ratio(r, 'attn', 'h3_fast')} "
            f"| {mib(r, 'h3_fast_mem')} | {mib(r, 'h3_ref_mem')} | {mib(r, 'attn_mem')} "
            f"| {r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
