"""One rank of the mixed-precision checks (torchrun, or a plain process as a one-rank job).

For each ZeRO stage asked for (`--zero`), builds a `train.precision=bf16` engine of the tiny model
(`tests.parallel.common`), trains `--steps` steps and reports, for the parameters tagged as SSM
dynamics and for the others: their dtypes in the running engine, the dtype of the gradients
autograd gives the SSM ones, the optimizer's fp32 master copies and Adam state (DeepSpeed's
`safe_get_full_*`), how far the SSM values moved and whether they still lie on the bf16 grid, and
whether what the SSM kernels are fed (`discretize_diagonal`, `h3_core`) is exactly those fp32
values. With `--loss-steps N`, also trains the same model N steps in fp32 and in bf16 on one fixed
batch (memorization: the loss must fall in a few dozen steps) and reports both loss curves.

Writes `rank{r}.json` into `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

import hippo.pretrain.models.h3 as h3_module
import hippo.pretrain.models.ssm as ssm_module
from hippo.parallel.groups import destroy_parallel, init_parallel
from hippo.pretrain.builders import build_engine
from hippo.pretrain.models.h3 import H3
from hippo.pretrain.models.ssm import is_ssm_dynamics
from tests.helpers import free_port
from tests.parallel.common import config, global_batches, rank_micro_batches

LOSS_RUN = ["optim.lr=0.003", "optim.warmup_fraction=0.1"]


def dtypes(tensors) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})


class KernelInputs:
    """Records what the SSM kernels receive: `discretize_diagonal`'s and `h3_core`'s SSM arguments."""

    def __init__(self):
        self.discretize: list[tuple[torch.Tensor, ...]] = []
        self.h3_core: list[tuple[torch.Tensor, ...]] = []
        self._originals = (ssm_module.discretize_diagonal, h3_module.h3_core)

    def __enter__(self):
        discretize, h3_core = self._originals

        def spy_discretize(log_dt, log_A_real, A_imag, B, C):
            self.discretize.append(tuple(t.detach().clone() for t in (log_dt, log_A_real, A_imag, B)))
            return discretize(log_dt, log_A_real, A_imag, B, C)

        def spy_h3_core(q, k, v, shift_B, shift_C, shift_D, ssm, D, **kwargs):
            self.h3_core.append(tuple(t.detach().clone() for t in (shift_B, shift_C, shift_D, D)))
            return h3_core(q, k, v, shift_B, shift_C, shift_D, ssm, D, **kwargs)

        ssm_module.discretize_diagonal, h3_module.h3_core = spy_discretize, spy_h3_core
        return self

    def __exit__(self, *exc):
        ssm_module.discretize_diagonal, h3_module.h3_core = self._originals


def precision_case(cfg, state) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    layout = state.layout
    engine = build_engine(cfg, state)
    named = list(engine.module.named_parameters())
    ssm = [(n, p) for n, p in named if is_ssm_dynamics(p)]
    others = [p for _, p in named if not is_ssm_dynamics(p)]
    if not ssm:  # a pipeline stage without H3 layers
        return {"optimizer": type(engine.optimizer).__name__, "n_ssm": 0, "other_dtypes": dtypes(others)}
    grad_dtypes: set[str] = set()  # of each backward's gradient, as autograd computes it
    hooks = [p.register_hook(lambda g: grad_dtypes.add(str(g.dtype).removeprefix("torch."))) for _, p in ssm]
    initial = {n: p.detach().clone() for n, p in ssm}
    losses = [engine.train_batch(rank_micro_batches(b, layout, state.dp_rank)) for b in global_batches(cfg)]
    for h in hooks:
        h.remove()

    masters = {n: safe_get_full_fp32_param(p) for n, p in ssm}
    inner = engine.optimizer.optimizer  # the AdamW inside DeepSpeed's wrapper, over its fp32 partitions
    [ssm_group] = [g for g in inner.param_groups if g["name"] == "ssm"]
    adam = [t for p in ssm_group["params"] for t in inner.state[p].values() if t.dim() > 0]
    values = torch.cat([p.detach().float().flatten() for _, p in ssm])
    moved = torch.cat([(p.detach().float() - initial[n].float()).flatten() for n, p in ssm])
    a_imag = [(p.detach().float(), initial[n].float()) for n, p in ssm if n.endswith("A_imag")]

    # One more forward, recording what the kernels are given, against the fp32 masters.
    with KernelInputs() as seen:
        engine.eval_batch(rank_micro_batches(global_batches(cfg)[0], layout, state.dp_rank))
    h3_layers = [m for m in engine.module.modules() if isinstance(m, H3)]
    want_discretize = [tuple(masters[_name(named, p)] for p in (m.diag_ssm.log_dt, m.diag_ssm.log_A_real,
                                                               m.diag_ssm.A_imag, m.diag_ssm.B)) for m in h3_layers]
    want_shift_B = [masters[_name(named, m.shift_ssm.B)] for m in h3_layers]
    # The first micro-batch passes every H3 layer in order before the next one starts.
    got_discretize, got_h3 = seen.discretize[: len(h3_layers)], seen.h3_core[: len(h3_layers)]
    return {
        "optimizer": type(engine.optimizer).__name__,
        "n_ssm": len(ssm),
        "ssm_dtypes": dtypes(p for _, p in ssm),
        "other_dtypes": dtypes(others),
        "ssm_grad_dtypes": sorted(grad_dtypes),
        "master_dtypes": dtypes(masters.values()),
        "adam_state_dtypes": dtypes(adam),
        "master_minus_param": max((masters[n] - p.detach().float()).abs().max().item() for n, p in ssm),
        "moved_fraction": (moved != 0).float().mean().item(),
        "off_bf16_grid_fraction": (values != values.bfloat16().float()).float().mean().item(),
        "a_imag_max": max(v.abs().max().item() for v, _ in a_imag),
        # A_imag ~ pi n reaches ~97, where bf16 values are 0.5 apart: moved, but by less than that.
        "a_imag_moved_fraction": torch.cat([(v != v0).flatten() for v, v0 in a_imag]).float().mean().item(),
        "a_imag_max_move": max((v - v0).abs().max().item() for v, v0 in a_imag),
        "kernel_input_dtypes": {
            "discretize_diagonal": dtypes(t for call in got_discretize for t in call),
            "h3_core": dtypes(t for call in got_h3 for t in call),
        },
        "discretize_minus_master": max((g - w).abs().max().item() for got, want in zip(got_discretize, want_discretize)
                                       for g, w in zip(got, want, strict=True)),
        "h3_core_shift_B_minus_master": max((got[0] - w).abs().max().item() for got, w in zip(got_h3, want_shift_B)),
        "losses": losses,
    }


def _name(named, param) -> str:
    return next(n for n, p in named if p is param)


def loss_run(precision: str, steps: int, state, args) -> list[float]:
    cfg = config([*args.set, *LOSS_RUN, f"train.steps={steps}", f"train.precision={precision}"])
    engine = build_engine(cfg, state)
    t = cfg.train
    batch = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1),
                          generator=torch.Generator().manual_seed(7))
    return [engine.train_batch(rank_micro_batches(batch, state.layout, state.dp_rank)) for _ in range(steps)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--zero", type=int, action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--loss-steps", type=int, default=0)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    if "WORLD_SIZE" not in os.environ:  # a plain process: a one-rank job
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    base = config(args.set)
    world = int(os.environ["WORLD_SIZE"])
    state = init_parallel(base.layout(world), base.train.seed)
    report: dict = {"rank": state.rank, "precision_cases": {}}
    for zero in args.zero:
        cfg = config([*args.set, "train.precision=bf16", f"parallel.zero_stage={zero}", f"train.steps={args.steps}"])
        case_state = dataclasses.replace(state, layout=cfg.layout(world))  # same groups, another ZeRO stage
        report["precision_cases"][str(zero)] = precision_case(cfg, case_state)
    if args.loss_steps:
        report["loss_runs"] = {p: loss_run(p, args.loss_steps, state, args) for p in ("fp32", "bf16")}
    (Path(args.out) / f"rank{state.rank}.json").write_text(json.dumps(report, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
