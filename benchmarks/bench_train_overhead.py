"""Framework tax of `hippo train`'s step against a bare PyTorch loop, and DP2 against one process.

    python benchmarks/bench_train_overhead.py                   # both parts, both models
    python benchmarks/bench_train_overhead.py --part overhead --models tiny_hybrid
    python benchmarks/bench_train_overhead.py --part dp --models tiny_hybrid
    python benchmarks/bench_train_overhead.py --part overhead --profile   # + cProfile of hippo's steps

Overhead (one process per model): `hippo.pretrain.trainer.train` runs for real (DeepSpeed engine,
data stream, metrics.jsonl, MLflow in the run folder's sqlite store, system metrics on, fp32).
Inside its loop, between two of its steps, the benchmark runs blocks of a bare PyTorch loop written
here: the same `HippoLM` class and seeded init (checked equal to the engine's weights), the same
AdamW parameter groups, betas, eps and schedule (`pretrain.optim`), the same clip and the same
micro/global batch, on batches read before timing. Rounds alternate (H B, B H, H B, ...); warm-up
steps are discarded. A hippo step is the wall time of one loop iteration (data, engine, metrics,
tracking, stop check), from the start of one `train_step` to the start of the next. Inside it the
benchmark wraps, without changing them: the wait for the next batch (`micro_batches`), the tracker
and metrics calls on the training thread, and (in MLflow's own worker thread) the store writes.

DP (`--part dp`): `hippo train` as one process (2 threads) and as two ranks (torchrun, 1 thread each)
on the same global batch and micro-batch; per rank the step splits into data wait, collectives
(torch.distributed calls, including the wait for the other rank) and the rest (compute and Python).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_125M = ["train.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=2", "train.precision=fp32"]
MODELS = {
    # name: (shipped config, overrides, steps per round per side, rounds). Short rounds, many of them: on
    # a shared machine the neighbours' load changes within seconds, and both sides must see the same.
    "tiny_hybrid": ("tiny_hybrid", ["train.seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=8"], 2, 20),
    "hybrid_125m": ("hybrid_125m", _125M, 1, 12),
    # The same without ZeRO (one rank partitions nothing): what ZeRO-1's own steps cost there.
    "hybrid_125m_zero0": ("hybrid_125m", [*_125M, "parallel.zero_stage=0"], 1, 12),
}
COMMON = ["train.eval_interval=0", "checkpoint.interval=0", "train.log_interval=10", "train.exit_interval=0"]


# ------------------------------------------------------------------------------ data
def prepare_data(root: Path, seq_len: int) -> Path:
    from hippo.data_pipeline.default_corpus import write_default_corpus
    from hippo.data_pipeline.prepare import prepare

    out = root / f"data_{seq_len}"
    if not out.exists():
        corpus = root / "corpus.jsonl"
        if not corpus.exists():
            write_default_corpus(corpus, 2_000_000)
        prepare([corpus], out, tokenizer="byte", seq_len=seq_len, val_fraction=0.0, progress=False)
    return out


def load_cfg(model: str, data: Path, steps: int, extra: list[str]):
    from hippo.pretrain.config import load_config

    config, overrides, *_ = MODELS[model]
    return load_config(config, [f"data.paths=[{data}]", f"train.steps={steps}", *COMMON, *overrides, *extra])


# ------------------------------------------------------------------------------ timing helpers
def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of every thread of this process)."""
    return time.perf_counter(), time.process_time()


class Sections:
    """Seconds per named section, attributed to the hippo step running at the time."""

    def __init__(self) -> None:
        self.step = -1
        self.by_step: dict[int, dict[str, float]] = {}
        self.lock = threading.Lock()

    def add(self, name: str, seconds: float, step: int | None = None) -> None:
        with self.lock:
            d = self.by_step.setdefault(self.step if step is None else step, {})
            d[name] = d.get(name, 0.0) + seconds

    def wrap(self, owner, attr: str, name: str, *, cpu: bool = False) -> None:
        """Time `owner.attr` (wall; with `cpu` also the calling thread's CPU time, as name_cpu)."""
        f = getattr(owner, attr)
        sections = self

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time() if cpu else 0.0
            try:
                return f(*args, **kwargs)
            finally:
                sections.add(name, time.perf_counter() - t0)
                if cpu:
                    sections.add(name + "_cpu", time.thread_time() - c0)

        setattr(owner, attr, timed)


def instrument_hippo(sections: Sections) -> None:
    """Wrap the data wait, metrics and tracking calls of the trainer's loop (timing only)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from hippo.pretrain import metrics, trainer, tracking

    sections.wrap(trainer, "micro_batches", "data_wait")
    sections.wrap(trainer, "step_metrics", "metrics")
    sections.wrap(metrics.MetricsFile, "write", "metrics_file")
    for name in ("log_metrics", "set_tags", "log_params"):
        sections.wrap(tracking.Tracker, name, "mlflow")
    sections.wrap(trainer, "stop_reason", "stop_check")
    # MLflow's async worker thread: the store writes behind log_batch(synchronous=False).
    sections.wrap(SqlAlchemyStore, "log_batch", "mlflow_store", cpu=True)
    from hippo.parallel.engine import FiniteStepAdamW

    sections.wrap(FiniteStepAdamW, "_any_rank_non_finite", "finite_check")


def instrument_engine_phases(sections: Sections) -> None:
    """DeepSpeed's pipeline engine (Hippo's engine for ZeRO <= 1): time each instruction it runs."""
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    names = {schedule.ForwardPass: "forward", schedule.BackwardPass: "backward",
             schedule.ReduceGrads: "reduce_grads", schedule.ReduceTiedGrads: "reduce_grads",
             schedule.OptimizerStep: "optimizer_step"}
    for instruction, name in names.items():
        f = PipelineEngine._INSTRUCTION_MAP[instruction]

        def timed(*args, _f=f, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                sections.add(_name, time.perf_counter() - t0)

        PipelineEngine._INSTRUCTION_MAP[instruction] = timed


def instrument_collectives(sections: Sections) -> None:
    import torch.distributed as dist

    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "all_gather",
                 "reduce_scatter", "reduce", "barrier", "_all_gather_base", "_reduce_scatter_base",
                 "all_gather_object", "broadcast_object_list"):
        if hasattr(dist, name):
            sections.wrap(dist, name, "collectives")


# ------------------------------------------------------------------------------ the bare loop
class BareLoop:
    """forward, backward (micro-batches accumulated), clip, AdamW step: plain PyTorch."""

    def __init__(self, cfg, batches: list) -> None:
        import torch

        from hippo.pretrain.builders import micro_batches
        from hippo.pretrain.models import HippoLM
        from hippo.pretrain.optim import optimizer_factory

        self.torch = torch
        self.model = HippoLM(cfg.model, seed=cfg.train.seed).train()
        self.optimizer, self.scheduler = optimizer_factory(cfg.optim, cfg.train.steps)(self.model, torch.optim.AdamW)
        self.clip = cfg.optim.grad_clip
        gas = cfg.train.global_batch_size // cfg.train.micro_batch_size
        self.steps = [micro_batches(iter(batches[i:i + gas]), gas) for i in range(0, len(batches) - gas + 1, gas)]
        self.n = 0

    def step(self) -> dict[str, float]:
        """One step; seconds of its forward, backward and clip + optimizer parts."""
        torch = self.torch
        micro = self.steps[self.n % len(self.steps)]
        self.n += 1
        total, parts = torch.zeros(()), {"forward": 0.0, "backward": 0.0}
        for input_ids, labels in micro:
            t0 = time.perf_counter()
            loss = self.model.loss(input_ids, labels) / len(micro)
            t1 = time.perf_counter()
            loss.backward()
            parts["forward"] += t1 - t0
            parts["backward"] += time.perf_counter() - t1
            total += loss.detach()
        t0 = time.perf_counter()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total.item()
        parts["optimizer_step"] = time.perf_counter() - t0
        return parts


def check_same_weights(bare: BareLoop, engine) -> float:
    """Max |bare - engine| over every parameter, by single-process name (0: the same init)."""
    from hippo.parallel.pipeline import canonical_named_parameters

    theirs = dict(canonical_named_parameters(engine.module))
    ours = dict(bare.model.named_parameters())
    if set(theirs) != set(ours):
        raise SystemExit(f"parameter names differ: {sorted(set(theirs) ^ set(ours))[:5]}")
    return max((ours[k].detach() - theirs[k].detach()).abs().max().item() for k in ours)


# ------------------------------------------------------------------------------ overhead worker
def schedule(warmup: int, rounds: int, n: int) -> tuple[list[str], dict[int, list[tuple[str, int]]]]:
    """Label of each hippo step, and the bare blocks (label, steps) to run before hippo step k."""
    blocks = [("H", "warm", warmup), ("B", "warm", warmup)]
    for r in range(rounds):
        pair = [("H", f"r{r}", n), ("B", f"r{r}", n)]
        blocks += pair if r % 2 == 0 else pair[::-1]
    labels: list[str] = []
    before: dict[int, list[tuple[str, int]]] = {}
    for kind, label, count in blocks:
        if kind == "H":
            labels += [label] * count
        else:
            before.setdefault(len(labels), []).append((label, count))
    labels.append("last")  # ends the last measured step; not measured itself (checkpoint, export)
    return labels, before


def overhead_worker(args) -> dict:
    import torch

    from hippo.pretrain import trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    n = args.steps or MODELS[args.model][2]
    labels, before = schedule(args.warmup, args.rounds or MODELS[args.model][3], n)
    cfg = load_cfg(args.model, Path(args.data), len(labels), args.set)
    # The bare loop's batches: the same data, read once before any timing.
    from hippo.data_pipeline.stream import build_stream

    stream = build_stream(cfg.data, dp_rank=0, dp_size=1, micro_batch_size=cfg.train.micro_batch_size,
                          global_batch_size=cfg.train.global_batch_size)
    it = iter(stream)
    gas = cfg.train.global_batch_size // cfg.train.micro_batch_size
    batches = [next(it) for _ in range(8 * gas)]
    del stream, it

    sections = Sections()
    instrument_hippo(sections)
    if not args.profile:
        instrument_engine_phases(sections)
    timeline = {"entry": {}, "start": {}, "bare": []}
    bare: dict[str, BareLoop] = {}
    profiler = cProfile.Profile() if args.profile else None
    orig_train_step = trainer.train_step

    def train_step(engine, batches_, grad_accum_steps):
        k = sections.step + 1
        now = clock()
        if profiler is not None and k > 0 and labels[k - 1].startswith("r"):
            profiler.disable()
        timeline["entry"][k] = now
        if "loop" not in bare:
            torch.manual_seed(0)
            bare["loop"] = BareLoop(cfg, batches)
            timeline["init_max_abs_diff"] = check_same_weights(bare["loop"], engine)
        for label, count in before.get(k, []):
            for _ in range(count):
                t0 = clock()
                parts = bare["loop"].step()
                t1 = clock()
                timeline["bare"].append((label, t1[0] - t0[0], t1[1] - t0[1], parts))
        sections.step = k
        timeline["start"][k] = clock()
        if profiler is not None and labels[k].startswith("r"):
            profiler.enable()
        return orig_train_step(engine, batches_, grad_accum_steps)

    trainer.train_step = train_step
    load_before = os.getloadavg()[0]
    result = trainer.train(cfg, Path(args.run_dir))
    hippo = [(labels[k], timeline["entry"][k + 1][0] - timeline["start"][k][0],
              timeline["entry"][k + 1][1] - timeline["start"][k][1]) for k in range(len(labels) - 1)]
    out = {"model": args.model, "threads": torch.get_num_threads(), "steps_per_round": n,
           "tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_len,
           "init_max_abs_diff": timeline["init_max_abs_diff"], "hippo": hippo, "bare": timeline["bare"],
           "sections": {str(k): v for k, v in sections.by_step.items()}, "labels": labels,
           "final_loss": result.losses[result.step], "load": [load_before, os.getloadavg()[0]]}
    if profiler is not None:
        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(45)
        s2 = io.StringIO()
        pstats.Stats(profiler, stream=s2).sort_stats("tottime").print_stats(30)
        out["profile"] = s.getvalue() + "\n" + s2.getvalue()
    return out


def summarize_overhead(r: dict) -> dict:
    """Medians over every measured step of each side (rounds interleave the two sides, so both sample the
    same neighbours): on a shared machine a step can stall for seconds (another process takes a core and
    the other OpenMP thread waits), which a mean would count."""
    measured = [k for k, lab in enumerate(r["labels"][:-1]) if lab.startswith("r")]
    hippo = [r["hippo"][k] for k in measured]
    bare = [row for row in r["bare"] if row[0].startswith("r")]
    sec = [r["sections"].get(str(k), {}) for k in measured]

    def med(values) -> float:
        return 1e3 * statistics.median(values)

    def ratio(rows_h, rows_b, i=1) -> float:
        return statistics.median(row[i] for row in rows_h) / statistics.median(row[i] for row in rows_b)

    rounds = sorted({row[0] for row in hippo}, key=lambda lab: int(lab[1:]))
    first, second = set(rounds[:len(rounds) // 2]), set(rounds[len(rounds) // 2:])
    engine = ("forward", "backward", "reduce_grads", "optimizer_step")
    out = {
        "bare_ms": med(row[1] for row in bare), "hippo_ms": med(row[1] for row in hippo),
        "ratio": ratio(hippo, bare),
        "halves": [ratio([h for h in hippo if h[0] in half], [b for b in bare if b[0] in half]) for half in (first, second)],
        "cpu_ratio": ratio(hippo, bare, 2),
        "bare_cpu_ms": med(row[2] for row in bare), "hippo_cpu_ms": med(row[2] for row in hippo),
        "steps_per_side": len(hippo),
        "bare_rest_ms": med(row[1] - sum(row[3].values()) for row in bare),
        "hippo_rest_ms": med(h[1] - sum(s.get(k, 0.0) for k in engine) for h, s in zip(hippo, sec)),
    }
    for name in ("forward", "backward", "optimizer_step"):
        out[f"bare_{name}_ms"] = med(row[3][name] for row in bare)
    for name in (*engine, "data_wait", "mlflow", "metrics", "metrics_file", "stop_check", "finite_check"):
        out[f"{name}_ms" if name not in engine else f"hippo_{name}_ms"] = med(s.get(name, 0.0) for s in sec)
    # MLflow's thread works when its requests arrive (one per METRICS_INTERVAL_S), not once per step.
    for name in ("mlflow_store", "mlflow_store_cpu"):
        out[f"{name}_ms"] = 1e3 * statistics.mean(s.get(name, 0.0) for s in sec)
    return out


# ------------------------------------------------------------------------------ DP worker
def dp_worker(args) -> dict:
    import torch
    import torch.distributed as dist

    from hippo.pretrain import trainer

    logging.basicConfig(level=logging.WARNING)
    n = args.steps or 9
    total = args.warmup + n + 1
    cfg = load_cfg(args.model, Path(args.data), total, args.set)
    sections = Sections()
    instrument_hippo(sections)
    instrument_engine_phases(sections)
    instrument_collectives(sections)
    timeline = {"entry": {}, "start": {}}
    orig_train_step = trainer.train_step

    def train_step(engine, batches_, grad_accum_steps):
        k = sections.step + 1
        timeline["entry"][k] = time.perf_counter()
        sections.step = k
        timeline["start"][k] = time.perf_counter()
        return orig_train_step(engine, batches_, grad_accum_steps)

    trainer.train_step = train_step
    rank = int(os.environ.get("RANK", "0"))
    trainer.train(cfg, Path(args.run_dir))
    measured = range(args.warmup, total - 1)
    steps = [timeline["entry"][k + 1] - timeline["start"][k] for k in measured]
    # Medians (a neighbour's burst can stall a step for seconds on a shared machine).
    sec = {name: statistics.median(sections.by_step.get(k, {}).get(name, 0.0) for k in measured)
           for name in ("data_wait", "collectives", "mlflow", "metrics", "metrics_file", "stop_check", "forward",
                        "backward", "reduce_grads", "optimizer_step")}
    out = {"rank": rank, "threads": torch.get_num_threads(), "step_s": statistics.median(steps), "steps": steps,
           "sections": sec, "tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_len}
    del dist
    return out


# ------------------------------------------------------------------------------ parent
def run_worker(argv: list[str], out: Path, env: dict | None = None) -> list[dict]:
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (an old one would be resumed)
    for old in out.parent.glob(out.name + ".*"):
        old.unlink()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.parent.glob(out.name + ".*"))]


def model_setting(model: str, key: str) -> int:
    """An integer setting of a benchmarked model, from its overrides in `MODELS`."""
    _, overrides, *_ = MODELS[model]
    return int(next(o for o in overrides if o.startswith(key + "=")).split("=")[1])


def part_overhead(args, root: Path) -> list[dict]:
    rows = []
    for model in args.models:
        data = prepare_data(root, model_setting(model, "train.seq_len"))
        out = root / f"overhead_{model}.json"
        argv = [sys.executable, __file__, "--worker", "overhead", "--model", model, "--data", str(data),
                "--run-dir", str(root / f"run_{model}"), "--out", str(out), "--rounds", str(args.rounds),
                "--warmup", str(args.warmup)]
        argv += ["--steps", str(args.steps)] if args.steps else []
        argv += ["--profile"] if args.profile else []
        for s in args.set:
            argv += ["--set", s]
        r = run_worker(argv, out)[0]
        s = summarize_overhead(r)
        rows.append({**r, **s})
        if args.profile:
            print(f"==== cProfile of hippo's measured steps, {model} ====\n{r['profile']}", file=sys.stderr)
    return rows


def part_dp(args, root: Path) -> list[dict]:
    rows = []
    for model in args.dp_models:
        data = prepare_data(root, model_setting(model, "train.seq_len"))
        mb = model_setting(model, "train.global_batch_size") // 2
        sets = [f"train.micro_batch_size={mb}", *args.set]
        results = {}
        for trial in range(args.dp_trials):
            for ranks in (1, 2):
                out = root / f"dp_{model}_{ranks}_{trial}.json"
                worker = [__file__, "--worker", "dp", "--model", model, "--data", str(data), "--run-dir",
                          str(root / f"dprun_{model}_{ranks}_{trial}"), "--out", str(out), "--warmup", str(args.warmup)]
                worker += ["--steps", str(args.steps)] if args.steps else []
                for s in sets:
                    worker += ["--set", s]
                if ranks == 1:
                    argv, env = [sys.executable, *worker], {}
                else:
                    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *worker]
                    env = {"OMP_NUM_THREADS": "1"}  # what torchrun sets anyway; said here to keep it quiet
                results.setdefault(ranks, []).append(run_worker(argv, out, env))
        rows.append({"model": model, "micro_batch_size": mb, "results": results})
    return rows


def print_overhead(rows: list[dict]) -> None:
    print("\n### Step time: hippo train vs a bare PyTorch loop (one process, fp32)\n")
    print("Medians over the measured steps of each side, ms. Ratio: hippo / bare (in brackets: the same from "
          "the first and the second half of the rounds). MLflow's thread: the store's writes (wall / CPU), "
          "averaged per step.\n")
    print("| model | tokens/step | threads | steps per side | bare step | hippo step | ratio | target <= 1.10 | "
          "CPU-time ratio | data wait | MLflow (training thread) | MLflow's thread | metrics + metrics.jsonl | "
          "stop check | finiteness check |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        verdict = "met" if r["ratio"] <= 1.10 else "missed"
        print(f"| {r['model']} | {r['tokens_per_step']} | {r['threads']} | {r['steps_per_side']} | {r['bare_ms']:.1f} | "
              f"{r['hippo_ms']:.1f} | {r['ratio']:.3f} ({', '.join(f'{x:.3f}' for x in r['halves'])}) | {verdict} | "
              f"{r['cpu_ratio']:.3f} | {r['data_wait_ms']:.2f} | {r['mlflow_ms']:.2f} | "
              f"{r['mlflow_store_ms']:.1f} / {r['mlflow_store_cpu_ms']:.1f} | {r['metrics_ms'] + r['metrics_file_ms']:.2f} | "
              f"{r['stop_check_ms']:.2f} | {r['finite_check_ms']:.2f} |")
    print("\nWhere the step goes, ms (medians). Hippo: DeepSpeed's pipeline instructions (its optimizer step "
          "includes the clip); the rest is data, metrics, tracking, stop check and Python.\n")
    print("| model | side | forward | backward | reduce grads | clip + optimizer | rest | step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | bare | {r['bare_forward_ms']:.1f} | {r['bare_backward_ms']:.1f} | - | "
              f"{r['bare_optimizer_step_ms']:.1f} | {r['bare_rest_ms']:.1f} | {r['bare_ms']:.1f} |")
        print(f"| {r['model']} | hippo | {r['hippo_forward_ms']:.1f} | {r['hippo_backward_ms']:.1f} | "
              f"{r['hippo_reduce_grads_ms']:.1f} | {r['hippo_optimizer_step_ms']:.1f} | {r['hippo_rest_ms']:.1f} | "
              f"{r['hippo_ms']:.1f} |")
    for r in rows:
        print(f"\n{r['model']}: initial weights max |bare - engine| = {r['init_max_abs_diff']:.1e}; "
              f"{r['steps_per_round']} steps per round per side; CPU time per step bare {r['bare_cpu_ms']:.0f} ms, "
              f"hippo {r['hippo_cpu_ms']:.0f} ms; 1-minute load average {r['load'][0]:.2f} at the start, "
              f"{r['load'][1]:.2f} at the end")


def print_dp(rows: list[dict]) -> None:
    print("\n### DP2 (torchrun, 2 ranks x 1 thread) vs one process (2 threads), same global batch\n")
    print("Per step, ms (medians; DP2: mean of the two ranks). Forward, backward, reduce-grads and optimizer "
          "are DeepSpeed's pipeline instructions; collectives are every torch.distributed call, inside them or "
          "not, including the wait for the other rank.\n")
    print("| model | micro-batch | layout | step | tokens/s | DP2 / 1 process | forward | backward | reduce grads | "
          "optimizer step | of all that: collectives | data wait | metrics + MLflow | stop check | rest |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        tps = {}
        for ranks, trials in sorted(row["results"].items(), key=lambda kv: int(kv[0])):
            ranks = int(ranks)
            step = statistics.median(statistics.mean(rk["step_s"] for rk in trial) for trial in trials)
            tps[ranks] = trials[0][0]["tokens_per_step"] / step
            sec = {k: 1e3 * statistics.mean(rk["sections"][k] for trial in trials for rk in trial)
                   for k in trials[0][0]["sections"]}
            phases = sec["forward"] + sec["backward"] + sec["reduce_grads"] + sec["optimizer_step"]
            other = sec["mlflow"] + sec["metrics"] + sec["metrics_file"]
            rest = 1e3 * step - phases - sec["data_wait"] - other - sec["stop_check"]
            layout = "1 process" if ranks == 1 else "DP2"
            ratio = "1.00" if ranks == 1 else f"{tps[2] / tps[1]:.2f}"
            print(f"| {row['model']} | {row['micro_batch_size']} | {layout} | {1e3 * step:.0f} | {tps[ranks]:,.0f} | "
                  f"{ratio} | {sec['forward']:.0f} | {sec['backward']:.0f} | {sec['reduce_grads']:.0f} | "
                  f"{sec['optimizer_step']:.0f} | {sec['collectives']:.0f} | {sec['data_wait']:.1f} | {other:.1f} | "
                  f"{sec['stop_check']:.1f} | {rest:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["overhead", "dp", "all"], default="all")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="overhead part")
    ap.add_argument("--dp-models", nargs="+", default=["tiny_hybrid", "hybrid_125m"], choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=0, help="rounds per model (0: the model's default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0, help="steps per round; with --part dp: measured steps "
                    "(0: the model's default; 9 for dp)")
    ap.add_argument("--dp-trials", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--root", help="keep data and runs here (default: a temporary folder)")
    # worker side
    ap.add_argument("--worker", choices=["overhead", "dp"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--run-dir")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        result = overhead_worker(args) if args.worker == "overhead" else dp_worker(args)
        rank = os.environ.get("RANK", "0")
        Path(f"{args.out}.{rank}").write_text(json.dumps(result))
        return
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.part in ("overhead", "all"):
            print_overhead(part_overhead(args, root))
        if args.part in ("dp", "all"):
            print_dp(part_dp(args, root))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
