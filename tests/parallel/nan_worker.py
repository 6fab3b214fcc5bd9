"""One rank of a run whose gradient turns NaN on rank 1 only (launched by torchrun).

For each precision asked for, builds an engine, poisons one gradient of a block on rank 1 with a
hook (not the tied embedding: its gradient is shared between the first and last pipeline stage),
trains one step, then removes the hook and trains another. Writes per rank and precision whether
each step was skipped and whether this rank's weights (module and optimizer master copies) and
optimizer state changed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from hippo.parallel.groups import destroy_parallel, init_parallel
from hippo.parallel.pipeline import canonical_named_parameters
from hippo.pretrain.builders import build_engine
from tests.parallel.common import config, global_batches, rank_micro_batches

POISONED_RANK = 1


def weights(engine) -> list[torch.Tensor]:
    """Copies of every weight this rank holds: the module's and the optimizer's (fp32 masters)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = [p for _, p in canonical_named_parameters(engine.module)]
    tensors += [p for group in inner.param_groups for p in group["params"]]
    return [t.detach().clone() for t in tensors]


def unchanged(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def poison_a_block_gradient(engine) -> torch.utils.hooks.RemovableHandle:
    name, param = next((n, p) for n, p in canonical_named_parameters(engine.module)
                       if n.startswith("layers.") and p.requires_grad)
    print(f"rank {POISONED_RANK}: NaN gradient on {name}", flush=True)
    return param.register_hook(lambda grad: torch.full_like(grad, float("nan")))


def one_step(engine, batch, layout, dp_rank: int) -> dict:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    before = weights(engine)
    loss = engine.train_batch(rank_micro_batches(batch, layout, dp_rank))
    return {"skipped": engine.last_step_skipped, "weights_unchanged": unchanged(before, weights(engine)),
            "optimizer_state_entries": len(inner.state), "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", action="append", required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = config(args.set)
    layout = base.layout(int(os.environ["WORLD_SIZE"]))
    state = init_parallel(layout, base.train.seed)
    report = {"rank": state.rank, "pp": state.pp_rank, "dp": state.dp_rank}
    for precision in args.precision:
        cfg = config([*args.set, f"train.precision={precision}"])
        engine = build_engine(cfg, state)
        batches = global_batches(cfg)
        hook = poison_a_block_gradient(engine) if state.rank == POISONED_RANK else None
        poisoned = one_step(engine, batches[0], layout, state.dp_rank)
        if hook is not None:
            hook.remove()
        clean = one_step(engine, batches[1], layout, state.dp_rank)
        report[precision] = {"optimizer": type(engine.optimizer).__name__, "poisoned": poisoned, "clean": clean}
    (Path(args.out) / f"rank{state.rank}.json").write_text(json.dumps(report))
    destroy_parallel()


if __name__ == "__main__":
    main()
