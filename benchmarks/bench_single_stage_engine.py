"""A single-stage run through DeepSpeed's `PipelineEngine` against its plain `DeepSpeedEngine`, same model.

    python benchmarks/bench_single_stage_engine.py                      # tiny_hybrid, ZeRO 1 and 0
    python benchmarks/bench_single_stage_engine.py --model hybrid_125m --rounds 6
    torchrun --nproc_per_node 2 benchmarks/bench_single_stage_engine.py --pipeline 2 --zero 0   # item 4 at PP 2

One process, fp32. For each ZeRO stage the engines are built side by side from the same seed
(`hippo.parallel.engine.build_train_engine`, the engine a run gets except for the choice forced
here) and step in turns (A B C, A B C, ...) on the same batches; a step is one `train_batch` (all
micro-batches and the optimizer step), timed as wall time and as this process's CPU time (steadier on
a shared machine; run with OMP_NUM_THREADS=1 so both count one core). Engines:
- `pipeline`: `PipelineEngine` over the one-stage `PipelineModule` (what a single-stage ZeRO <= 1 run
  uses), with its gradient all-reduce skipped at ZeRO-0 as Hippo does (private item 4);
- `pipeline_allreduce` (ZeRO-0 only): the same without that skip;
- `plain`: `DeepSpeedEngine` over the same layer list unsplit (`SequentialLM`, ZeRO-2's path).
The losses of the first step are printed too: the engines must agree. With `--pipeline N` (under
torchrun, N ranks, one replica) only the two pipeline engines run: what item 4 saves there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hippo.parallel import engine as engine_module
from hippo.parallel.groups import destroy_parallel, init_parallel
from hippo.parallel.layout import ParallelLayout
from hippo.pretrain.config import load_config
from hippo.pretrain.optim import optimizer_factory


def build(cfg, state, *, pipelined: bool, skip_allreduce: bool):
    saved_pipelined, saved_skip = ParallelLayout.pipelined, engine_module.skip_single_replica_allreduce
    ParallelLayout.pipelined = property(lambda self: pipelined)
    if not skip_allreduce:
        engine_module.skip_single_replica_allreduce = lambda engine: None
    try:
        return engine_module.build_train_engine(cfg.model, state, optimizer_factory(cfg.optim, cfg.train.steps),
                                                seed=cfg.train.seed, grad_clip=cfg.optim.grad_clip)
    finally:
        ParallelLayout.pipelined, engine_module.skip_single_replica_allreduce = saved_pipelined, saved_skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_hybrid")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--zero", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--pipeline", type=int, default=1, help="stages (run under torchrun with as many ranks)")
    args = parser.parse_args()
    import os

    if "WORLD_SIZE" not in os.environ:  # not under torchrun
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29577"))
    for zero in args.zero:
        cfg = load_config(args.model, [f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
                                       f"train.global_batch_size={args.micro_batch * args.grad_accum}",
                                       f"parallel.zero_stage={zero}", "train.precision=fp32", "model.dropout=0.0",
                                       f"parallel.pipeline={args.pipeline}"])
        layout = cfg.layout(args.pipeline)
        state = init_parallel(layout, seed=cfg.train.seed)
        engines = {"pipeline": build(cfg, state, pipelined=True, skip_allreduce=True)}
        if zero == 0:
            engines["pipeline_allreduce"] = build(cfg, state, pipelined=True, skip_allreduce=False)
        if args.pipeline == 1:
            engines["plain"] = build(cfg, state, pipelined=False, skip_allreduce=False)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
                   for _ in range(args.grad_accum)]
        micro = [(b[:, :-1], b[:, 1:]) for b in batches]
        times: dict[str, list[float]] = {name: [] for name in engines}
        cpu_times: dict[str, list[float]] = {name: [] for name in engines}
        first: dict[str, float] = {}
        for r in range(args.warmup + args.rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = engines[name].train_batch(iter(micro))
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                first.setdefault(name, loss)
                if r >= args.warmup:
                    times[name].append(elapsed)
                    cpu_times[name].append(cpu)
        if state.rank != 0:
            del engines
            destroy_parallel()
            continue
        print(f"{args.model} PP {args.pipeline} ZeRO-{zero} seq {args.seq_len} mb {args.micro_batch} x {args.grad_accum}, "
              f"{torch.get_num_threads()} threads, {args.rounds} steps each:")
        ref = "plain" if "plain" in times else "pipeline_allreduce"
        base, cpu_base = statistics.median(times[ref]), statistics.median(cpu_times[ref])
        for name, ts in times.items():
            med, cpu = statistics.median(ts), statistics.median(cpu_times[name])
            print(f"  {name:20s} wall median {med * 1e3:8.1f} ms (min {min(ts) * 1e3:8.1f}, {med / base:5.3f}x {ref})  "
                  f"CPU median {cpu * 1e3:8.1f} ms ({cpu / cpu_base:5.3f}x {ref})  first loss {first[name]:.6f}")
        del engines
        destroy_parallel()


if __name__ == "__main__":
    main()
