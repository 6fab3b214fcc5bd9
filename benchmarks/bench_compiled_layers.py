"""The H3 layer against the attention layer, fwd+bwd, eager and compiled (issue 27's layer target).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compiled_layers.py [--threads 2] [--length 1024]
        [--batch 4] [--d-model 256] [--repeats 5]

Both layers are built as `bench_h3_layer.build` builds them (H3 on its fast path, attention on
causal SDPA), each as an eager copy and a copy compiled in place (`nn.Module.compile()`, as
`train.compile` does). After a warm-up call (the compilation, timed and printed), the four are
timed in alternation, median of `--repeats` rounds, wall clock at `--threads`: the ratios printed
(attention / H3, eager and compiled; compiled / eager per layer) are measured side by side in one
process, so a noisy machine moves numerator and denominator alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_h3_layer import build, fwd_bwd  # noqa: E402  (one way to build the layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    u = torch.randn(args.batch, args.length, args.d_model, requires_grad=True)
    layers = {}
    for kind in ("h3_fast", "attn"):
        eager = build(kind, args.d_model)
        compiled = copy.deepcopy(eager)
        compiled.compile()
        t0 = time.perf_counter()
        fwd_bwd(compiled, u)
        print(f"{kind}: compiled in {time.perf_counter() - t0:.1f} s (first call)", flush=True)
        fwd_bwd(eager, u)
        layers[f"{kind} eager"], layers[f"{kind} compiled"] = eager, compiled
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(args.repeats):
        for name, layer in layers.items():
            layer.zero_grad(set_to_none=True)
            u.grad = None
            t0 = time.perf_counter()
            fwd_bwd(layer, u)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, B {args.batch}, d {args.d_model}, "
          f"L {args.length}, median of {args.repeats}")
    for name, ms in med.items():
        print(f"  {name:14s} {ms:8.1f} ms")
    for mode in ("eager", "compiled"):
        print(f"  attention / H3, {mode}: {med[f'attn {mode}'] / med[f'h3_fast {mode}']:.2f}x")
    for kind in ("h3_fast", "attn"):
        print(f"  {kind} eager / compiled: {med[f'{kind} eager'] / med[f'{kind} compiled']:.2f}x")


if __name__ == "__main__":
    main()
