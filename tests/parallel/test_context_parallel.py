"""Context parallelism in the models: one sequence split over 2, 4 and 8 ranks trains like one process.

One torchrun job of 8 ranks (`context_model_worker.py`) runs every case: H3-only, S4D and hybrid
models (with no, rotary and learned positions), chunks down to 8 tokens (shorter than the shift
SSM's 63-input history), d_state 64 and 16, and dropout (H3 and S4D: the same masks for the same
positions as one process). The reference is the plain single-process model on
whole sequences, run in the same process.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, torchrun

pytestmark = pytest.mark.dist  # several ranks under torchrun (counted as slow)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("context_parallel")
    torchrun(8, [str(ROOT / "tests/parallel/context_model_worker.py"), "--out", str(out), "--sizes", "2", "4", "8"])
    rows = [row for rank in range(8) for row in json.loads((out / f"rank{rank}.json").read_text())]
    assert {(r["cp"], r["group"]) for r in rows} == {(2, 0), (2, 1), (2, 2), (2, 3), (4, 0), (4, 1), (8, 0)}
    return rows


def test_losses_and_gradients_match_one_process(results):
    for r in results:
        case = (r["model"], r["L"], r["cp"], r["d_state"], r["dtype"])
        assert r["mean_chunk_loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=0), case
        # Per tensor, relative to its largest gradient; a gradient that is analytically ~0
        # (attention's key bias without positions: softmax ignores a per-row constant) is
        # measured against the model's largest gradient / 100 instead of its own rounding noise.
        top = max(g["scale"] for g in r["grads"].values())
        bad = {n: g for n, g in r["grads"].items() if g["diff"] > 1e-5 * max(g["scale"], 1e-2 * top)}
        assert not bad, (case, bad)
    assert {r["cp"] for r in results} == {2, 4, 8}
    assert {r["model"] for r in results} >= {"h3", "s4d", "hybrid", "h3_dropout", "s4d_dropout"}
    assert any(r["L"] // r["cp"] < 63 for r in results if r["model"] == "hybrid")


def test_an_h3_layer_moves_the_designed_bytes_whatever_the_length(results):
    """Per H3 layer and rank, forward + backward: the halo (B, C, 63) and the state (B, C, N/2)
    complex are gathered, and their gradients reduce-scattered back. Nothing grows with L."""
    h3 = [r for r in results if r["model"] == "h3" and r["dtype"] == "torch.float32"]
    B, C, layers = 2, 16, 3
    for r in h3:
        halo = B * C * min(r["d_state"] - 1, r["L"] // r["cp"]) * 4
        state = B * C * (r["d_state"] // 2) * 8
        assert r["bytes"] == layers * 2 * (halo + state), r
    by_length = {}
    for r in h3:
        by_length.setdefault((r["cp"], r["d_state"]), set()).add((r["L"], r["bytes"]))
    assert any(len(v) == 2 for v in by_length.values())  # two lengths measured at one CP size
    for v in by_length.values():
        assert len({b for _, b in v}) == 1, v
