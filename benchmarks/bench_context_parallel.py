"""Context parallelism on this machine: memory per rank, step time, traffic and attention balance.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_context_parallel.py [--seq-len 16384] [--cp 1 2 4] [--h3-only]

For each CP size, one torchrun job (gloo, one thread per rank) runs the tiny hybrid (configs/
tiny_hybrid.yaml's model: d_model 128, 4 layers, attention at layer 1; fp32) on one sequence of
--seq-len tokens split over CP ranks (`parallel.context_parallel`), and reports per rank:

- peak memory of one forward + backward: the process's resident high-water mark (VmHWM, reset
  just before) above its resident size before the step, next to `parallel.memory.activation_bytes`
  for the same layout;
- step time: forward + backward + gradient all-reduce, median of --reps (wall clock, every rank
  between barriers). This machine has 2 cores, so CP ranks share them: expect no speed-up;
- one H3 layer and one attention layer alone (same chunk): the bytes their collectives send per
  rank (counted by wrapping torch.distributed's all-gather and reduce-scatter), and their CPU time
  per rank (thread time: the causal attention's work grows with the rank's position).

Traffic of the all-to-all scheme (Megatron's for Mamba: sequence -> channels and back, forward
and backward) is listed for comparison: 4 all-to-alls per layer, each moving (CP-1)/CP of a rank's
B x L/CP x d activations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from hippo.parallel.context_parallel import chunk_of, sequence_split
    from hippo.parallel.memory import activation_bytes
    from hippo.pretrain.config import load_config
    from hippo.pretrain.models import HippoLM
    from hippo.pretrain.models.linear import Linears
    from tests.parallel.collective_bytes import counted_collective_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(cp)))
    L = args.seq_len
    cfg = load_config("tiny_hybrid", [f"train.seq_len={L}", "train.micro_batch_size=1", "train.global_batch_size=1",
                                      f"parallel.context={cp}", "model.dropout=0",
                                      f"model.attn_layer_idx={'[]' if args.h3_only else '[1]'}"])
    split = sequence_split(group, rank, cp)
    model = HippoLM(cfg.model, Linears(sequence=split), seed=0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, L + 1), generator=torch.Generator().manual_seed(0))
    x, y = chunk_of(tokens[:, :-1], rank, cp), chunk_of(tokens[:, 1:], rank, cp)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        (model.loss(x, y) / cp).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)

    # Memory: the first step, from the resident size before it (no earlier step's freed pages).
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    step()
    peak = _status("VmHWM") - before
    times = []
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t0)

    def layer_cost(layer) -> tuple[int, float]:
        h = torch.randn(1, L // cp, cfg.model.d_model, requires_grad=True, generator=torch.Generator().manual_seed(1))
        dist.barrier()
        with counted_collective_bytes() as sent:
            t0 = time.thread_time()
            layer(h).sum().backward()
            cpu = time.thread_time() - t0
        return sent["bytes"], cpu

    h3_bytes, h3_cpu = layer_cost(model.layers["0"].mixer)
    attn_bytes, attn_cpu = layer_cost(model.layers["1"].mixer) if not args.h3_only else (0, 0.0)
    estimate = activation_bytes(cfg.model, cfg.layout(cp), L, precision="fp32")
    report = {"rank": rank, "cp": cp, "L": L, "peak": peak, "estimate": estimate, "step_s": statistics.median(times),
              "h3_bytes": h3_bytes, "h3_cpu_s": h3_cpu, "attn_bytes": attn_bytes, "attn_cpu_s": attn_cpu,
              "d_model": cfg.model.d_model, "d_state": cfg.model.d_state}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def run_cp(cp: int, args, tmp: Path) -> list[dict]:
    out = tmp / f"cp{cp}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp), "--master-port",
           str(29700 + cp), __file__, "--worker", "--out", str(out), "--seq-len", str(args.seq_len),
           "--reps", str(args.reps)] + (["--h3-only"] if args.h3_only else [])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(cp)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--h3-only", action="store_true", help="no attention layer (all four layers H3)")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        runs = {cp: run_cp(cp, args, Path(tmp)) for cp in args.cp}
    L = args.seq_len
    base = runs[min(runs)]
    model = "tiny H3-only (d_model 128, 4 H3 layers)" if args.h3_only else "tiny hybrid (d_model 128, 4 layers, attention at 1)"
    print(f"{model}, fp32, one sequence of {L} tokens; "
          f"1-min load {os.getloadavg()[0]:.2f} at the end\n")
    print("| CP | peak MiB per rank (max over ranks) | vs CP 1 | estimate MiB (parallel.memory) | step s (median) | "
          "step vs CP 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for cp, reps in runs.items():
        peak = max(r["peak"] for r in reps)
        step = reps[0]["step_s"]
        print(f"| {cp} | {peak / mib:.0f} | {peak / max(r['peak'] for r in base):.2f} | {reps[0]['estimate'] / mib:.0f} | "
              f"{step:.2f} | {step / base[0]['step_s']:.2f} |")
    print("\nPer rank: bytes sent by one layer's collectives (forward + backward) and its CPU seconds\n")
    print("| CP | rank | H3 layer bytes | all-to-all scheme bytes (same layer) | attention layer bytes | "
          "H3 CPU s | attention CPU s | attention vs rank mean |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cp, reps in runs.items():
        mean_attn = statistics.mean(r["attn_cpu_s"] for r in reps) or 1.0
        d = reps[0]["d_model"]
        a2a = 4 * (L // cp) * d * 4 * (cp - 1) // cp  # per rank: 4 all-to-alls of (CP-1)/CP of B x L/CP x d fp32
        for r in reps:
            print(f"| {cp} | {r['rank']} | {r['h3_bytes']:,} | {a2a:,} | {r['attn_bytes']:,} | {r['h3_cpu_s']:.3f} | "
                  f"{r['attn_cpu_s']:.3f} | {r['attn_cpu_s'] / mean_attn:.2f} |")


if __name__ == "__main__":
    main()
