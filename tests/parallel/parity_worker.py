"""One rank of a parallel training run for the parity tests (launched by torchrun).

Trains `--steps` optimizer steps on the global batches of `common.global_batches` and writes, per
rank, its losses, parameter counts and optimizer-state bytes; rank 0 also writes the full
parameters after the steps, gathered under single-process names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from hippo.kernels.torch_compat import dynamo_counts
from hippo.parallel.gather import gather_to_rank0
from hippo.parallel.groups import destroy_parallel, init_parallel
from hippo.parallel.pipeline import canonical_named_parameters
from hippo.pretrain.builders import build_engine
from tests.parallel.common import config, global_batches, rank_micro_batches


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (Adam moments) this rank holds (inside DeepSpeed's ZeRO wrapper)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        t.numel() * t.element_size()
        for s in inner.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = config(args.set)
    layout = cfg.layout(int(os.environ["WORLD_SIZE"]))
    state = init_parallel(layout, cfg.train.seed)
    engine = build_engine(cfg, state)
    graphs_before = dynamo_counts()
    losses = []
    for batch in global_batches(cfg):
        losses.append(engine.train_batch(rank_micro_batches(batch, layout, state.dp_rank)))
    compiled = getattr(engine, "compiled", None)
    # Dropout streams: one draw from the default generator and one inside the TP-rank context.
    with engine.linears.tp_rng():
        tp_draw = torch.rand(4).tolist()
    default_draw = torch.rand(4).tolist()
    local = {n: p.numel() for n, p in canonical_named_parameters(engine.module)}
    params = gather_to_rank0(engine.module, state)
    out = Path(args.out)
    report = {
        "rank": state.rank, "tp": state.tp_rank, "pp": state.pp_rank, "dp": state.dp_rank,
        "losses": losses, "local_param_numel": local,
        "optimizer_state_bytes": optimizer_state_bytes(engine.optimizer),
        "tp_rng_draw": tp_draw, "default_rng_draw": default_draw,
        # `train.compile`: what compile_blocks did, and graphs or breaks dynamo added while training
        # (a guard the warm-up missed recompiles; 0 when every training call hit a compiled entry).
        "compiled": dataclasses.asdict(compiled) if compiled is not None else None,
        "graphs_while_training": [a - b for a, b in zip(dynamo_counts(), graphs_before)],
    }
    (out / f"rank{state.rank}.json").write_text(json.dumps(report))
    if params is not None:
        torch.save(params, out / "params.pt")
    destroy_parallel()


if __name__ == "__main__":
    main()
