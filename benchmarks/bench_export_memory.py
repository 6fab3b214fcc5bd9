"""Rank 0's memory while a TP 2 x PP 2 run writes its end-of-run export: stage by stage (what
`hippo train` does) against gathering every parameter to rank 0 (what it did before).

    python benchmarks/bench_export_memory.py [--d-model 768 --n-layer 12]

Runs 4 gloo ranks on this machine (a 125M-shaped hybrid by default, fp32, no training step: the
export's memory does not depend on it). Each rank samples its own RSS every 5 ms while exporting;
the table gives rank 0's peak increase over its RSS before the export, as a multiple of one
stage's and of the whole model's fp32 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path


def worker(out: Path, d_model: int, n_layer: int) -> None:
    import psutil
    import torch.distributed as dist

    from hippo.parallel.gather import gather_to_rank0, stage_full_parameters
    from hippo.parallel.groups import destroy_parallel, init_parallel
    from hippo.pretrain.builders import build_engine
    from hippo.pretrain.config import load_config
    from hippo.pretrain.export import save_export, save_export_by_stage

    cfg = load_config("hybrid_125m", [f"model.d_model={d_model}", f"model.n_layer={n_layer}", "model.n_head=8",
                                      "parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=1"])
    state = init_parallel(cfg.layout(4), 0)
    engine = build_engine(cfg, state)
    proc = psutil.Process()

    def peak_during(fn) -> int:
        dist.barrier()
        base, peak, done = proc.memory_info().rss, [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.005)

        t = threading.Thread(target=sample)
        t.start()
        fn()
        done.set()
        t.join()
        dist.barrier()
        return peak[0] - base

    def by_stage() -> None:
        params = stage_full_parameters(engine.module, state)
        writer = state.tp_rank == 0 and state.dp_rank == 0
        save_export_by_stage(out / "staged", params if writer else None, stage=state.pp_rank, stages=2,
                             model_cfg=cfg.model, tokenizer="byte", step=0)

    def gathered() -> None:  # the previous export: every stage's tensors pickled to rank 0
        merged = gather_to_rank0(engine.module, state)
        if state.rank == 0:
            save_export(out / "gathered", merged, cfg.model, tokenizer="byte", step=0)

    staged, full = peak_during(by_stage), peak_during(gathered)
    stage_bytes = sum(p.numel() * 4 for p in stage_full_parameters(engine.module, state).values())
    if state.rank == 0:
        (out / "rank0.json").write_text(json.dumps({"staged": staged, "gathered": full, "stage_bytes": stage_bytes}))
    destroy_parallel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.d_model, args.n_layer)
        return
    import subprocess

    from hippo.pretrain.config import load_config
    from hippo.pretrain.models import count_parameters

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", __file__, "--worker", tmp,
               "--d-model", str(args.d_model), "--n-layer", str(args.n_layer)]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
        r = json.loads((Path(tmp) / "rank0.json").read_text())
    cfg = load_config("hybrid_125m", [f"model.d_model={args.d_model}", f"model.n_layer={args.n_layer}", "model.n_head=8"])
    model_bytes = count_parameters(cfg.model) * 4
    mib = 2**20
    print(f"hybrid d_model {args.d_model}, {args.n_layer} layers: model {model_bytes / mib:.0f} MiB fp32, rank 0's stage "
          f"{r['stage_bytes'] / mib:.0f} MiB; TP 2 x PP 2 on gloo, 4 ranks\n")
    print("| export | rank 0 peak RSS increase (MiB) | x its stage | x whole model |")
    print("|---|---:|---:|---:|")
    for name, key in (("stage by stage (hippo train now)", "staged"), ("gathered to rank 0 (before)", "gathered")):
        print(f"| {name} | {r[key] / mib:.0f} | {r[key] / r['stage_bytes']:.2f} | {r[key] / model_bytes:.2f} |")


if __name__ == "__main__":
    main()
