"""Peak memory of one H3 layer fwd+bwd: the old diagonal SSM kernel (a (C, N/2, L) complex
Vandermonde kept for backward) vs the blocked `kernels.ssm.diagonal_kernel` (issue 13).

The layer is `pretrain.models.h3.H3` with `conv_impl="reference"`, the path that builds the
length-L diagonal kernel on CPU (the Triton path builds it the same way on GPU; the default
CPU path "chunked" never forms a length-L kernel and is shown for context). "before" runs the
same layer with the previous kernel formula (kept below as `diagonal_kernel_unblocked`)
patched into `kernels.h3_core`; "after" runs the code as it is.

Each variant runs in a fresh subprocess: the peak resident set (VmHWM, reset just before the
measured fwd+bwd through /proc/self/clear_refs; ru_maxrss where that is not allowed) above the
RSS right before it, after a warm-up on a short input. The same run also counts the distinct
bytes autograd saves for backward (saved_tensors_hooks, parameters excluded). The kernel alone
(`diagonal_kernel` fwd+bwd at that size) is timed in-process, median of --repeats.

    .venv/bin/python benchmarks/bench_ssm_memory.py            # d_model 2560, L 2048, batch 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from hippo.kernels import discretize_diagonal
from hippo.kernels.ssm import diagonal_kernel
from hippo.pretrain.models import H3

# Not `import hippo.kernels.h3_core as ...`: the package re-exports the function `h3_core`,
# which would shadow the module.
h3_core_mod = importlib.import_module("hippo.kernels.h3_core")

VARIANTS = ("before", "after", "chunked")
LABELS = {
    "before": "before: reference path, unblocked kernel (old)",
    "after": "after: reference path, blocked kernel (new)",
    "chunked": "default CPU path (conv_impl chunked), for context",
}


def diagonal_kernel_unblocked(ssm, length: int) -> torch.Tensor:
    """The previous `kernels.ssm.diagonal_kernel`, verbatim: materializes dA^l as (C, N/2, L)."""
    steps = torch.arange(length, device=ssm.dA.device)
    vandermonde = torch.exp(torch.log(ssm.dA).unsqueeze(-1) * steps.to(ssm.dA.real.dtype))  # (C, N/2, L)
    return 2 * torch.einsum("cn,cnl->cl", ssm.C * ssm.dB, vandermonde).real


def build(variant: str, d: int) -> H3:
    torch.manual_seed(0)
    layer = H3(d, 64, layer_idx=0, conv_impl="chunked" if variant == "chunked" else "reference")
    if variant == "before":
        h3_core_mod.diagonal_kernel = diagonal_kernel_unblocked  # what h3_core_ref calls
    assert h3_core_mod.h3_core_ref.__globals__["diagonal_kernel"] is (
        diagonal_kernel_unblocked if variant == "before" else diagonal_kernel)
    return layer


def fwd_bwd(layer: H3, u: torch.Tensor) -> None:
    layer(u).sum().backward()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak(hwm: bool) -> int:
    if hwm:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def saved_activation_bytes(layer: H3, u: torch.Tensor) -> int:
    """Distinct storages autograd saves for one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(u)
    del out
    return sum(seen.values())


def probe(variant: str, d: int, B: int, L: int) -> dict:
    """Runs in a subprocess: one measured fwd+bwd of the layer."""
    layer = build(variant, d)
    fwd_bwd(layer, torch.randn(1, 64, d, requires_grad=True))  # warm-up: thread pools, FFT plans
    layer.zero_grad(set_to_none=False)  # gradient buffers exist before the measured run
    u = torch.randn(B, L, d, requires_grad=True)
    base = _rss()
    hwm = _reset_peak()
    t0 = time.perf_counter()
    fwd_bwd(layer, u)
    seconds = time.perf_counter() - t0
    peak = _peak(hwm) - base
    u.grad = None
    saved = saved_activation_bytes(layer, u)
    return {"peak": peak, "saved": saved, "seconds": seconds, "hwm": hwm}


def run_probe(variant: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", variant, "--d-model", str(args.d_model),
           "--batch", str(args.batch), "--length", str(args.length), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_kernel(fn, d: int, L: int, repeats: int) -> float:
    """Median seconds of diagonal_kernel fwd+bwd (through the discretization) at (d, N/2 = 32, L)."""
    torch.manual_seed(0)
    layer = H3(d, 64, layer_idx=0).diag_ssm
    w = torch.randn(d, L)
    times = []
    for _ in range(repeats + 1):  # first is warm-up
        layer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        (fn(layer.discrete(), L) * w).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=2560)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", choices=VARIANTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, B, L = args.d_model, args.batch, args.length
    if args.probe:
        print(json.dumps(probe(args.probe, d, B, L)))
        return

    rows = {v: run_probe(v, args) for v in VARIANTS}
    t_old = time_kernel(diagonal_kernel_unblocked, d, L, args.repeats)
    t_new = time_kernel(diagonal_kernel, d, L, args.repeats)
    vander = d * 32 * L * 8

    def mib(x):
        return f"{x / 2**20:,.0f}"

    before, after = rows["before"], rows["after"]
    lines = [
        f"### One H3 layer fwd+bwd: d_model {d}, L {L}, batch {B}, d_state 64, fp32, CPU, {args.threads} threads",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores. "
        f"The (C, N/2, L) complex64 Vandermonde is {mib(vander)} MiB.",
        f"Peak: {'VmHWM reset before the run' if before['hwm'] else 'ru_maxrss'}, above the RSS before it.",
        "",
        "| variant | peak RSS above baseline (MiB) | saved for backward, activations (MiB) | fwd+bwd (s) |",
        "|---|---:|---:|---:|",
    ]
    for v in VARIANTS:
        r = rows[v]
        lines.append(f"| {LABELS[v]} | {mib(r['peak'])} | {mib(r['saved'])} | {r['seconds']:.2f} |")
    lines += [
        f"| before / after | {before['peak'] / after['peak']:.1f}x | {before['saved'] / after['saved']:.1f}x "
        f"| {before['seconds'] / after['seconds']:.2f}x |",
        "",
        f"`diagonal_kernel` alone (discretization + kernel, fwd+bwd, C {d}, N/2 32, L {L}, "
        f"median of {args.repeats}): before {t_old * 1e3:.0f} ms, after {t_new * 1e3:.0f} ms "
        f"({t_old / t_new:.1f}x faster).",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
