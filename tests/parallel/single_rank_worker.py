"""One rank: Megatron's linears on a one-rank tensor-parallel group take the plain-matmul path, and
give bitwise the outputs and gradients Megatron's own autograd function gives (see
`hippo.parallel.tensor_parallel._dense`). Writes a JSON report to argv[1]."""

from __future__ import annotations

import json
import sys

import torch

from hippo.parallel.groups import destroy_parallel, init_parallel
from hippo.parallel.layout import ParallelLayout
from hippo.parallel.tensor_parallel import megatron_linears
from hippo.pretrain.config import load_config
from hippo.pretrain.models import HippoLM


def loss_and_grads(model: HippoLM, batch: torch.Tensor, *, fast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    for m in model.modules():
        if hasattr(m, "single_rank"):
            m.single_rank = fast
    model.zero_grad(set_to_none=True)
    loss = model.loss(batch[:, :-1], batch[:, 1:])
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def main() -> None:
    init_parallel(ParallelLayout(1, 1, 1, 1, 1, 1), seed=0)
    report = {}
    for name in ("tiny_hybrid", "tiny_h3"):
        cfg = load_config(name).model
        model = HippoLM(cfg, megatron_linears(0, 1, 1), seed=0)
        batch = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
        fast_layers = sum(bool(getattr(m, "single_rank", False)) for m in model.modules())
        megatron, plain = loss_and_grads(model, batch, fast=False), loss_and_grads(model, batch, fast=True)
        report[name] = {
            "fast_layers": fast_layers,
            "same_loss": megatron[0] == plain[0],
            "grads_differing": [k for k in megatron[1] if not torch.equal(megatron[1][k], plain[1][k])],
        }
    destroy_parallel()
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
