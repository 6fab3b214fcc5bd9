"""Megatron's linears on one tensor-parallel rank: the plain-matmul path, bitwise Megatron's results."""

import json

from tests.helpers import ROOT, torchrun


def test_one_rank_linears_skip_megatrons_autograd_function_with_bitwise_the_same_gradients(tmp_path):
    out = tmp_path / "report.json"
    torchrun(1, [str(ROOT / "tests/parallel/single_rank_worker.py"), str(out)])
    for name, got in json.loads(out.read_text()).items():
        assert got["fast_layers"] > 0, f"{name}: no linear took the one-rank path"
        assert got["same_loss"] and got["grads_differing"] == [], (name, got)
