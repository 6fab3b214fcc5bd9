"""Dispatch cost of the `hippo::` custom ops (`kernels.ops`): an H3 layer's eager fwd+bwd through
the ops (`ops.always()`) against the same layer calling the autograd Functions (`ops.direct()`, what
eager code does by default: `ops.routed`).
One thread, CPU time (time.thread_time), the two variants interleaved, median of --repeats:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_custom_ops.py --d-model 256 --batch 4 --length 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hippo.kernels import ops
from hippo.pretrain.models import H3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--documents", action="store_true", help="one document start per row (doc_start)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = H3(args.d_model, 64, layer_idx=0, conv_impl="chunked")
    u = torch.randn(args.batch, args.length, args.d_model, requires_grad=True)
    ds = None
    if args.documents:
        ds = torch.zeros(args.batch, args.length, dtype=torch.bool)
        ds[:, args.length // 3] = True

    def step(ctx) -> float:
        layer.zero_grad(set_to_none=True)
        u.grad = None
        with ctx:
            t0 = time.thread_time()
            layer(u, doc_start=ds).sum().backward()
            return time.thread_time() - t0

    variants = {"ops": ops.always, "direct": ops.direct}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for make in variants.values():
        step(make())  # warm-up
    for _ in range(args.repeats):
        for name, make in variants.items():
            times[name].append(step(make()))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"H3 fwd+bwd B={args.batch} d={args.d_model} L={args.length} documents={args.documents} "
          f"(1 thread, CPU ms, median of {args.repeats}, interleaved)")
    for k, v in med.items():
        print(f"  {k:7s} {v:8.2f} ms   (min {min(times[k]) * 1e3:.2f})")
    print(f"  ops / direct = {med['ops'] / med['direct']:.4f}")


if __name__ == "__main__":
    main()
