"""bf16 as DeepSpeed's bf16 mode (Hippo's `train.precision=bf16`: bf16 weights, fp32 masters, SSM
dynamics kept fp32) against DeepSpeed's public `torch_autocast` mode (fp32 weights, bf16 compute),
with fp32 beside them: memory per parameter and CPU step time of a tiny model, one process.

    python benchmarks/bench_bf16_modes.py [--steps 5] [--zero 0 1]

Memory per parameter: bytes of every distinct tensor storage the engine holds when the optimizer
steps (module weights and gradients, the DeepSpeed optimizer wrapper's flat buffers and
partitions, the torch optimizer's state), found by walking the engine's objects, divided by the
model's parameter count. Measured at the second step's optimizer call (Adam's moments exist,
gradients not yet released). Step time: median over `--steps` steps after one warm-up step, as wall
time and as the process's CPU time (steadier on a shared machine). Each (mode, ZeRO stage) runs in a
process of its own: DeepSpeed keeps torch_autocast state in module globals. These CPUs run bf16
matmuls ~400x slower than fp32: the model is tiny, and CPU times say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from hippo.parallel.deepspeed_compat import BF16_AUTOCAST
from hippo.parallel.engine import build_train_engine
from hippo.parallel.groups import destroy_parallel, init_parallel
from hippo.pretrain.config import load_config
from hippo.pretrain.optim import optimizer_factory

TINY = ["model.vocab_size=257", "model.d_model=64", "model.n_layer=4", "model.n_head=4", "model.attn_layer_idx=[1]",
        "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=100"]
MODES = {"fp32": "fp32", "bf16 (DeepSpeed bf16 mode, Hippo's)": "bf16", "bf16 (torch_autocast)": BF16_AUTOCAST}


def storages(obj, seen: dict[int, int], depth: int = 0) -> None:
    """Adds every tensor storage reachable from `obj` (tensors, containers, plain objects' fields)."""
    if depth > 12 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":
            s = obj.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        if obj.is_leaf and obj.grad is not None:
            storages(obj.grad, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            storages(k, seen, depth + 1)
            storages(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            storages(v, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer):
        storages(obj.state, seen, depth + 1)
        storages([g["params"] for g in obj.param_groups], seen, depth + 1)
        storages({k: v for k, v in vars(obj).items() if k not in ("state", "param_groups")}, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)) and obj.__class__.__module__.startswith(
            ("deepspeed", "hippo", "torch.optim")):
        storages(vars(obj), seen, depth + 1)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def measure(precision: str, zero: int, steps: int, state) -> dict:
    cfg = load_config("tiny_hybrid", [*TINY, f"parallel.zero_stage={zero}"])
    layout = cfg.layout(1)
    st = dataclasses.replace(state, layout=layout)
    engine = build_train_engine(cfg.model, st, optimizer_factory(cfg.optim, cfg.train.steps), seed=cfg.train.seed,
                                precision=precision, grad_clip=cfg.optim.grad_clip)
    n_params = sum(p.numel() for p in engine.module.parameters())
    calls, held = [0], {}

    def at_step(optimizer, args, kwargs) -> None:
        calls[0] += 1
        if calls[0] == 2:
            weights: dict[int, int] = {}
            storages([p.detach() for p in engine.module.parameters()], weights)
            grads: dict[int, int] = {}
            storages([p.grad for p in engine.module.parameters() if p.grad is not None], grads)
            rest: dict[int, int] = {}
            storages(engine.optimizer, rest)
            held["weights"] = sum(weights.values())
            held["grads"] = sum(v for k, v in grads.items() if k not in weights)
            held["optimizer_state"] = sum(v for k, v in rest.items() if k not in weights and k not in grads)

    hook = inner_optimizer(engine.optimizer).register_step_pre_hook(at_step)
    gen = torch.Generator().manual_seed(0)
    wall, cpu = [], []
    for _ in range(steps + 1):
        batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.train.seq_len + 1), generator=gen)
        micro = [(b[:, :-1], b[:, 1:]) for b in batch.split(cfg.train.micro_batch_size)]
        t0, c0 = time.perf_counter(), time.process_time()
        engine.train_batch(micro)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    hook.remove()
    return {"bytes_per_param": sum(held.values()) / n_params, **{k: v / n_params for k, v in held.items()}, "wall_s": statistics.median(wall[1:]),
            "cpu_s": statistics.median(cpu[1:]), "optimizer": type(engine.optimizer).__name__, "params": n_params}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--one", nargs=2, metavar=("PRECISION", "ZERO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
        base = load_config("tiny_hybrid", TINY)
        state = init_parallel(base.layout(1), base.train.seed)
        result = measure(args.one[0], int(args.one[1]), args.steps, state)
        destroy_parallel()
        print("RESULT " + json.dumps({**result, "threads": torch.get_num_threads()}), flush=True)
        return
    rows = []
    for zero in args.zero:
        for name, precision in MODES.items():
            proc = subprocess.run([sys.executable, __file__, "--one", precision, str(zero), "--steps", str(args.steps)],
                                  capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{name} at ZeRO {zero} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            rows.append((name, zero, json.loads(line.removeprefix("RESULT "))))
    r0 = rows[0][2]
    print(f"tiny hybrid (d_model 64, 4 layers, {r0['params']:,} parameters), 8 x 32 tokens per step, one process, "
          f"{r0['threads']} threads; step times: median of {args.steps} after a warm-up step\n")
    print("| mode | ZeRO | DeepSpeed optimizer | bytes per parameter: total = module weights + module grads + "
          "optimizer (masters, moments, flat grad buffers) | s/step (wall) | s/step (process CPU) |")
    print("|---|---:|---|---|---:|---:|")
    for name, zero, r in rows:
        print(f"| {name} | {zero} | {r['optimizer']} | {r['bytes_per_param']:.1f} = {r['weights']:.1f} + "
              f"{r['grads']:.1f} + {r['optimizer_state']:.1f} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} |")


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


if __name__ == "__main__":
    main()
