"""Cost of document isolation (`model.document_isolation`): a training step with it on vs off.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_document_isolation.py [--models tiny_hybrid hybrid_125m]
        [--reps 5] [--set model.n_layer=2 ...]

A step is what the trainer does per micro-batch on one process: forward, backward, gradient
clipping and an AdamW step (`pretrain.optim`), fp32 on the CPU. Each model runs on the same token
windows twice per repeat, isolation off then on (interleaved, so drift in the machine's load hits
both; the order alternates), and the median of each is reported with their ratio, for two boundary densities (the ratio
is of the step's CPU time on one thread, robust to other jobs on a shared machine; the wall-clock
ratio is printed next to it):

- `sparse`: an EOS every 512 tokens (about the Pile's document density at seq_len 2048);
- `dense`: an EOS every 64 tokens (the worst case worth supporting).

Shapes: hybrid_125m at seq_len 2048, micro-batch 1; tiny_hybrid at seq_len 256, micro-batch 8
(their config files' models). `--set` overrides the model of both (e.g. `model.n_layer=2
model.attn_layer_idx=[1]` for a 2-layer slice when a full 125m step is too slow here); the report
says what ran. The weights and optimizer are shared by both settings (only `cfg.document_isolation`
flips), so the two differ in the masking work alone.

Before the steps, one attention layer of each model's shape runs alone (forward + backward, same
boundaries): the part of a step the attention mask changes, with less noise than a whole step.

Until every mixer takes `doc_start` (H3 and S4D get it with the layers' half of issue 25) the
script still runs: those layers are called without it, and the report says that only the
attention layers (and the boundary map) are isolated, so the ratio is the attention share only.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import statistics
import time

import torch

from hippo.pretrain.config import apply_overrides, from_dict, load_yaml
from hippo.pretrain.config import HippoConfig
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.h3 import H3
from hippo.pretrain.models.s4d import S4D
from hippo.pretrain.optim import build_optimizer

SHAPES = {"hybrid_125m": (2048, 1), "tiny_hybrid": (256, 8)}  # config: (seq_len, micro-batch)
DENSITIES = {"sparse": 512, "dense": 64}  # tokens per document


def windows(batch: int, seq_len: int, vocab: int, eos: int, period: int, seed: int = 0) -> torch.Tensor:
    """(batch, seq_len + 1) random tokens (never EOS elsewhere) with an EOS every `period` tokens,
    each row's boundaries shifted differently (row r's first at (r * 181) % period), so that with a
    window shorter than `period` some rows hold a boundary and others none, as in packed data."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (batch, seq_len + 1), generator=gen)
    ids[ids >= eos] += 1  # skip the EOS id
    for row in range(batch):
        ids[row, (row * 181) % period :: period] = eos
    return ids


def unisolated_ssm_layers() -> list[str]:
    """The SSM mixers that cannot take `doc_start` yet (the layers' half of issue 25 missing)."""
    return [layer.__name__ for layer in (H3, S4D) if "doc_start" not in inspect.signature(layer.forward).parameters]


def _drop_doc_start(model: HippoLM) -> None:
    """Call the SSM mixers that lack `doc_start` without it (attention-only isolation)."""
    for block in model.layers.values():
        mixer = block.mixer
        if isinstance(mixer, (H3, S4D)) and "doc_start" not in inspect.signature(type(mixer).forward).parameters:
            forward = mixer.forward
            mixer.forward = lambda u, inference_params=None, *, doc_start=None, _f=forward: _f(u, inference_params)


def run_model(name: str, overrides: list[str], reps: int) -> list[dict]:
    seq_len, batch = SHAPES[name]
    data = apply_overrides(load_yaml(name), [*overrides, "model.dropout=0"])
    cfg = from_dict(HippoConfig, data)
    eos = cfg.model.vocab_size - 1
    on = dataclasses.replace(cfg.model, document_isolation=True, eos_id=eos)
    off = dataclasses.replace(on, document_isolation=False)
    torch.manual_seed(0)
    model = HippoLM(on, seed=0).train()
    _drop_doc_start(model)
    optimizer = build_optimizer(model, cfg.optim)

    def step(ids: torch.Tensor, cfg_model) -> tuple[float, float]:
        """(wall seconds, this thread's CPU seconds) of one step."""
        model.cfg = cfg_model
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        return time.perf_counter() - t0, time.thread_time() - c0

    rows = []
    for density, period in DENSITIES.items():
        ids = windows(batch, seq_len, cfg.model.vocab_size, eos, period)
        step(ids, off), step(ids, on)  # warm-up (allocator, first-call costs)
        times = {"off": [], "on": []}
        for rep in range(reps):  # the order alternates too: neither setting always runs second
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                times[mode].append(step(ids, off if mode == "off" else on))
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
        rows.append({"model": name, "density": density, "tokens_per_document": period, "seq_len": seq_len,
                     "micro_batch": batch, "n_layer": cfg.model.n_layer, "attn_layer_idx": cfg.model.attn_layer_idx,
                     "off_cpu_s": cpu["off"], "on_cpu_s": cpu["on"], "ratio": cpu["on"] / cpu["off"],
                     "off_wall_s": wall["off"], "on_wall_s": wall["on"], "wall_ratio": wall["on"] / wall["off"],
                     "off_all": times["off"], "on_all": times["on"]})
    return rows


def run_attention_layer(name: str, reps: int) -> list[dict]:
    """One attention layer of `name`'s shape alone, forward + backward, isolation off vs on (CPU
    seconds, median of interleaved repeats): the part of the step the mask changes, with less noise
    than a whole step."""
    from hippo.pretrain.models import CausalSelfAttention
    from hippo.pretrain.models.documents import document_starts

    seq_len, batch = SHAPES[name]
    m = from_dict(HippoConfig, apply_overrides(load_yaml(name), [])).model
    torch.manual_seed(0)
    layer = CausalSelfAttention(m.d_model, m.n_head, layer_idx=0)
    x = torch.randn(batch, seq_len, m.d_model, requires_grad=True)
    rows = []
    for density, period in DENSITIES.items():
        doc_start = document_starts(windows(batch, seq_len, m.vocab_size, m.vocab_size - 1, period)[:, :-1],
                                    m.vocab_size - 1)
        times = {"off": [], "on": []}
        for rep in range(reps + 1):
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                c0 = time.thread_time()
                layer(x, doc_start=doc_start if mode == "on" else None).sum().backward()
                if rep:  # the first round warms up
                    times[mode].append(time.thread_time() - c0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": name, "density": density, "off_cpu_s": med["off"], "on_cpu_s": med["on"],
                     "ratio": med["on"] / med["off"], "boundaries": int(doc_start.sum())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="model override for every model, key=value")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: with one thread the step's CPU time is this thread's, which "
                         "stays meaningful on a machine other jobs share; 0: torch's default)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    missing = unisolated_ssm_layers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, {args.reps} interleaved repeats")
    if missing:
        print(f"NOTE: {', '.join(missing)} take no doc_start yet: only attention layers are isolated "
              "(the ratio is the attention share only)")
    rows = []
    for name in args.models:
        for row in run_attention_layer(name, max(args.reps, 5)):
            rows.append(row)
            print(f"{row['model']:12s} one attention layer fwd+bwd, {row['density']:6s} ({row['boundaries']} "
                  f"boundaries): CPU off {row['off_cpu_s'] * 1e3:8.1f} ms on {row['on_cpu_s'] * 1e3:8.1f} ms "
                  f"ratio {row['ratio']:.3f}", flush=True)
    for name in args.models:
        for row in run_model(name, args.set, args.reps):
            rows.append(row)
            print(f"{row['model']:12s} L={row['seq_len']} B={row['micro_batch']} layers={row['n_layer']} "
                  f"attn={row['attn_layer_idx']} {row['density']:6s} (EOS every {row['tokens_per_document']:3d}): "
                  f"CPU off {row['off_cpu_s'] * 1e3:8.1f} ms on {row['on_cpu_s'] * 1e3:8.1f} ms ratio {row['ratio']:.3f}"
                  f" | wall ratio {row['wall_ratio']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"unisolated_layers": missing, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
