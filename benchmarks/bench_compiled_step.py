"""`train.compile` on CPU: does compiling the blocks pay for itself within the quickstart's 300 steps?

The quickstart's model (configs/tiny_hybrid.yaml: d 128, 4 layers, attention at layer 1, seq 256,
batch 8, fp32): one training step (forward, backward, AdamW) of the eager model against the same
model with its blocks compiled in place by `compile_blocks` (as `hippo train` does), interleaved
after warm-up; plus the compilation itself (the warm-up calls `hippo train` makes). Inductor
compiles in this process (TORCHINDUCTOR_COMPILE_THREADS=1) and its C++ compiler runs as waited-for
children, so this process's CPU time plus its children's counts all of it; with --threads 2 the CPU time is summed over both threads (wall time is printed too, but this
machine is shared). Break-even: compile time / (eager step - compiled step).

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_COMPILE_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH=. \\
        .venv/bin/python benchmarks/bench_compiled_step.py --threads 1

Run it a second time with the same TORCHINDUCTOR_CACHE_DIR for the warm-cache compile time.
Also prints what each step saves for backward (saved-tensor hooks), the part of a step's peak
memory compiling can change.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from hippo.kernels.torch_compat import dynamo_counts
from hippo.parallel.compiled import compile_blocks
from hippo.pretrain.config import load_config
from hippo.pretrain.models import HippoLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quickstart-steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny_hybrid")
    batch, length = cfg.train.micro_batch_size, cfg.train.seq_len
    torch.manual_seed(0)
    eager = HippoLM(cfg.model)
    compiled = copy.deepcopy(eager)
    cpu0, wall0 = _cpu_with_children(), time.perf_counter()
    result = compile_blocks(compiled.layers, micro_batch_size=batch, chunk_length=length, documents=False)
    compile_cpu, compile_wall = _cpu_with_children() - cpu0, time.perf_counter() - wall0
    assert result.error is None, result.error
    models = {"eager": eager, "compiled": compiled}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, length + 1))

    def step(name: str) -> tuple[float, float]:
        model, opt = models[name], optimizers[name]
        cpu, wall = time.process_time(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        return time.process_time() - cpu, time.perf_counter() - wall

    for name in models:  # warm-up (the optimizer's state, allocations)
        step(name)
        step(name)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name in models:
            times[name].append(step(name))
    cpu = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    wall = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    n = args.quickstart_steps
    print(f"tiny_hybrid step B={batch} L={length}, {args.threads} thread(s), median of {args.repeats} interleaved")
    print(f"  compile: {compile_cpu:.1f} s CPU, {compile_wall:.1f} s wall ({result.blocks} blocks, {result.graphs} "
          f"graphs, {result.graph_breaks} graph breaks)")
    for k in models:
        print(f"  {k:9s} step {cpu[k] * 1e3:8.1f} ms CPU  {wall[k] * 1e3:8.1f} ms wall")
    saved = cpu["eager"] - cpu["compiled"]
    print(f"  compiled / eager = {cpu['compiled'] / cpu['eager']:.3f} (CPU)")
    graphs_before = dynamo_counts()
    mem = {k: saved_for_backward(m, tokens) for k, m in models.items()}
    recompiled = dynamo_counts() != graphs_before
    print(f"  saved for backward (the step's peak beyond weights, gradients and AdamW state, equal in both): "
          f"eager {mem['eager'] / 2**20:.1f} MiB, compiled {mem['compiled'] / 2**20:.1f} MiB "
          f"({mem['compiled'] / mem['eager']:.3f})" + (" [measured with a recompile]" if recompiled else ""))
    print(f"  {n} steps: eager {n * cpu['eager']:.1f} s, compiled {compile_cpu + n * cpu['compiled']:.1f} s "
          f"(compile included) CPU; break-even " + (f"{compile_cpu / saved:.0f} steps" if saved > 0 else "never"))


def saved_for_backward(model: HippoLM, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (parameters excluded),
    through saved-tensor hooks (a compiled graph saves through its autograd Function too)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in own)


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its finished children (inductor's C++ compiler runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    main()
