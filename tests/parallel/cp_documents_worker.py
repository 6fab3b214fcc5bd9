"""One rank of the layer-level check of packed documents under context parallelism (torchrun, 4 ranks).

For CP 2 and 4 the ranks form groups; each runs an H3 or S4D layer on its chunk of the same
sequences with its slice of the document starts, and back-propagates a fixed linear loss. The
reference is the same layer in one process on whole sequences with the whole map (itself held to
per-document float64 oracles in tests/kernels/test_document_isolation.py). Each rank writes the
relative differences of its chunk's outputs and input gradients and of the group-summed
parameter gradients.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from hippo.parallel.context_parallel import chunk_of, sequence_split
from hippo.pretrain.models.h3 import H3
from hippo.pretrain.models.linear import Linears
from hippo.pretrain.models.s4d import S4D


def starts(B: int, L: int, cp: int) -> torch.Tensor:
    """Row 0: a start exactly on every rank edge, one just after an edge, two in a row.
    Row 1: one document spanning three (CP 4) or both (CP 2) ranks, a start at L - 1.
    Row 2: one start inside rank 1's chunk: the next rank's incoming state comes from after it
    only (the carry from rank 0 stops there). Row 3: no start at all (the plain carry)."""
    T = L // cp
    ds = torch.zeros(B, L, dtype=torch.bool)
    ds[0, [r * T for r in range(1, cp)]] = True
    ds[0, [T + 1, T // 2, T // 2 + 1]] = True
    ds[1, [3, (cp - 1) * T + T // 3, L - 1]] = True
    ds[2, T + T // 2] = True
    return ds


def layer(kind: str, d: int, linears: Linears, conv_impl: str) -> torch.nn.Module:
    if kind == "h3":
        return H3(d, 64, layer_idx=0, linears=linears, conv_impl=conv_impl)
    return S4D(d, 64, layer_idx=0, linears=linears)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run(kind: str, L: int, group, rank: int, cp: int, dtype: torch.dtype, conv_impl: str = "auto") -> dict:
    B, d = 4, 8
    g = torch.Generator().manual_seed(L)
    u = torch.randn(B, L, d, generator=g, dtype=dtype)
    w = torch.randn(B, L, d, generator=g, dtype=dtype)
    ds = starts(B, L, cp)
    torch.manual_seed(0)
    ref = layer(kind, d, Linears(), conv_impl).to(dtype)
    u_ref = u.clone().requires_grad_()
    (ref(u_ref, doc_start=ds) * w).sum().backward()
    with torch.no_grad():
        want = ref(u, doc_start=ds)
    model = layer(kind, d, Linears(sequence=sequence_split(group, rank, cp)), conv_impl).to(dtype)
    model.load_state_dict(ref.state_dict())
    T = L // cp
    mine = u[:, rank * T : (rank + 1) * T].clone().requires_grad_()
    out = model(mine, doc_start=chunk_of(ds, rank, cp))
    (out * w[:, rank * T : (rank + 1) * T]).sum().backward()
    grads = {}
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        gp = p.grad.clone()
        dist.all_reduce(gp, group=group)
        grads[n] = rel(gp, r.grad)
    return {
        "kind": kind, "L": L, "cp": cp, "dtype": str(dtype), "impl": conv_impl, "rank": rank,
        "out": rel(out.detach(), want[:, rank * T : (rank + 1) * T]),
        "input_grad": rel(mine.grad, u_ref.grad[:, rank * T : (rank + 1) * T]),
        "param_grads": grads,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    f32, f64 = torch.float32, torch.float64
    for cp in (2, 4):
        groups = [dist.new_group(list(range(s, s + cp))) for s in range(0, world, cp)]
        group, cp_rank = groups[rank // cp], rank % cp
        cases = [("h3", 96 * cp, f64, "auto"), ("h3", 96 * cp, f32, "auto"), ("s4d", 96 * cp, f64, "auto"),
                 ("h3", 96 * cp, f64, "reference"), ("h3", 8 * cp, f64, "auto")]  # chunks of 8: halo over ranks
        for kind, L, dtype, impl in cases:
            results.append(run(kind, L, group, cp_rank, cp, dtype, impl))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
