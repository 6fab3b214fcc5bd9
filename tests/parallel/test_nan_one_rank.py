"""A NaN gradient on one rank only skips the step on every rank, weights untouched everywhere.

Rank 1 alone gets a NaN gradient (a hook on one of its block parameters): in DP2 it is one of the
two data-parallel replicas, in PP2 the last pipeline stage, whose gradients stage 0 never sees.
Each layout runs in fp32 and bf16, whose overflow checks differ: ZeRO-1 (the default) leaves it to
DeepSpeed's ZeRO optimizer (global gradient norm, or its bf16 overflow check); ZeRO-0 on a
pipeline to `FiniteStepAdamW` (fp32: its one all-reduce over the world) and DeepSpeed's BF16
optimizer (bf16). One torchrun job per layout (~30 s each).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, torchrun

pytestmark = pytest.mark.dist  # several ranks under torchrun (counted as slow)

LAYOUTS = {"dp2": ["parallel.pipeline=1"], "pp2": ["parallel.pipeline=2"],
           "pp2_zero0": ["parallel.pipeline=2", "parallel.zero_stage=0"]}
PRECISIONS = ["fp32", "bf16"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_nan_gradient_on_one_rank_skips_the_step_on_every_rank(name, tmp_path):
    args = ["--out", str(tmp_path), *[a for p in PRECISIONS for a in ("--precision", p)],
            *[a for s in LAYOUTS[name] for a in ("--set", s)]]
    torchrun(2, [str(ROOT / "tests/parallel/nan_worker.py"), *args])
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for precision in PRECISIONS:
        for rep in reports:
            got = rep[precision]
            where = f"{name} {precision} rank {rep['rank']} ({got['optimizer']})"
            assert got["poisoned"]["skipped"], f"{where}: the NaN step was not skipped"
            assert got["poisoned"]["weights_unchanged"], f"{where}: the NaN step changed weights"
            assert got["poisoned"]["optimizer_state_entries"] == 0, f"{where}: Adam state after a skipped step"
            # The check can see a step: the next, finite one is applied and moves the weights.
            assert not got["clean"]["skipped"] and not got["clean"]["weights_unchanged"], where
