"""One rank of the model-level context-parallel check (launched by torchrun on 8 ranks).

For every CP size in --sizes, the ranks form groups of that size; each group splits the same
sequences into chunks, runs a model on its chunk with a `SequenceSplit`, and back-propagates
its share of the mean loss. Every rank also runs the single-process model on whole sequences.
Rank 0 of each group writes the losses and the gradients summed over the group next to the
single-process ones, and the bytes the collectives moved per forward+backward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from hippo.parallel.context_parallel import chunk_of, sequence_split
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.linear import Linears
from tests.parallel.collective_bytes import counted_collective_bytes

MODELS = {
    "h3": dict(mixer="h3"),
    "s4d": dict(mixer="s4d"),
    "hybrid": dict(mixer="h3", attn_layer_idx=[1]),
    "hybrid_rotary": dict(mixer="h3", attn_layer_idx=[1], position_embedding="rotary"),
    "learned_positions": dict(mixer="h3", attn_layer_idx=[1], position_embedding="learned", max_position_embeddings=2048),
    # Dropout on embeddings and residual branches: the masks one process draws for these positions.
    "h3_dropout": dict(mixer="h3", dropout=0.1),
    "s4d_dropout": dict(mixer="s4d", dropout=0.1),
}

def model_config(name: str, d_state: int) -> ModelConfig:
    return ModelConfig(vocab_size=61, d_model=16, n_layer=3, n_head=2, d_state=d_state, **MODELS[name])


def run(name: str, L: int, group, cp_rank: int, cp: int, d_state: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    tokens = torch.randint(0, 61, (2, L + 1), generator=torch.Generator().manual_seed(L))
    x, y = tokens[:, :-1], tokens[:, 1:]
    cfg = model_config(name, d_state)
    ref = HippoLM(cfg, seed=7)
    torch.manual_seed(123)  # the dropout generator: the same draws in both models
    ref_loss = ref.loss(x, y)
    ref_loss.backward()
    split = sequence_split(group, cp_rank, cp)
    model = HippoLM(cfg, Linears(sequence=split), seed=7)
    torch.manual_seed(123)
    with counted_collective_bytes() as sent:
        loss = model.loss(chunk_of(x, cp_rank, cp), chunk_of(y, cp_rank, cp))
        (loss / cp).backward()
    moved = sent["bytes"]
    losses = torch.stack([loss.detach()]).repeat(cp)
    dist.all_gather_into_tensor(losses, loss.detach().reshape(1), group=group)
    grads = {}
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        grads[n] = {"diff": (g - r.grad).abs().max().item(), "scale": r.grad.abs().max().item()}
    torch.set_default_dtype(torch.float32)
    return {"model": name, "L": L, "cp": cp, "d_state": d_state, "dtype": str(dtype), "ref_loss": ref_loss.item(),
            "mean_chunk_loss": losses.mean().item(), "grads": grads, "bytes": moved}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for cp in args.sizes:
        groups = [dist.new_group(list(range(s, s + cp))) for s in range(0, world, cp)]
        group, cp_rank = groups[rank // cp], rank % cp
        f32, f64 = torch.float32, torch.float64
        cases = [(name, 96 * cp, 64, f32) for name in MODELS]
        cases += [(name, 96 * cp, 64, f64) for name in ("h3", "s4d", "hybrid")]  # exact, not just close
        cases += [("hybrid", 8 * cp, 64, f32)]  # chunks of 8: the 63-input halo spans several ranks
        cases += [("h3", 192 * cp, 64, f32), ("h3", 96 * cp, 16, f32)]  # bytes against L; another state size
        for name, L, d_state, dtype in cases:
            r = run(name, L, group, cp_rank, cp, d_state, dtype)
            if rank % cp == 0:
                results.append({**r, "group": rank // cp})
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
