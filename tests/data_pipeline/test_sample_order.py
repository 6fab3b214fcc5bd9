"""The global order as a pure function: permutations, mixing, mixtures, layout checks, old orders refused."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hippo.data_pipeline.config import DataConfig, validate_data_parallel
from hippo.data_pipeline.sample_order import ORDER_NAME, FeistelPermutation, SampleOrder, check_saved_order

SHARDS = [[7, 7, 7, 7, 7, 3], [5, 5, 2]]


def _order(shards=(SHARDS[0],), **kw) -> SampleOrder:
    args = dict(weights=[1.0] * len(shards), seed=3, global_batch_size=4)
    return SampleOrder(list(shards), **{**args, **kw})


def _epoch(order: SampleOrder, epoch: int) -> list[tuple[int, int, int]]:
    src, shard, idx = order.epoch(epoch).locate(np.arange(order.samples_per_epoch_total))
    return list(zip(src.tolist(), shard.tolist(), idx.tolist()))


def test_each_epoch_is_a_permutation_that_changes_with_epoch_and_seed():
    order = _order()
    all_samples = sorted((0, s, i) for s, n in enumerate(SHARDS[0]) for i in range(n))
    e0, e1 = _epoch(order, 0), _epoch(order, 1)
    assert sorted(e0) == all_samples and sorted(e1) == all_samples
    assert e0 != e1
    assert _epoch(_order(seed=4), 0) != e0
    assert _epoch(_order(), 0) == e0  # deterministic: a pure function of (seed, epoch, index)
    assert [order.locate(g) for g in range(order.samples_per_epoch)] == e0[:order.samples_per_epoch]
    assert order.locate(order.samples_per_epoch + 5) == e1[5]  # global indices run over epochs


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 65_537, 300_007])
def test_the_computed_permutation_is_a_bijection_fixed_by_its_seed(n):
    perm = FeistelPermutation(n, [1, 2])[np.arange(n)]
    assert np.array_equal(np.sort(perm), np.arange(n))
    assert np.array_equal(perm, FeistelPermutation(n, [1, 2])[np.arange(n)])
    if n > 5:
        assert not np.array_equal(perm, FeistelPermutation(n, [1, 3])[np.arange(n)])
        assert not np.array_equal(perm, np.arange(n))


def test_unshuffled_order_is_manifest_order_source_after_source():
    order = _order(SHARDS, shuffle=False)
    assert _epoch(order, 0) == [(s, k, i) for s, shards in enumerate(SHARDS) for k, n in enumerate(shards)
                                for i in range(n)]


def test_mixture_weights_hold_over_an_epoch():
    """Weight 2.0 = every sample of that folder twice per epoch; 0.5 = half of it, the other half next epoch."""
    order = _order(SHARDS, weights=[2.0, 0.5], seed=0, global_batch_size=2)
    n0, n1 = sum(SHARDS[0]), sum(SHARDS[1])
    assert order.slots == [2 * n0, round(0.5 * n1)]
    e0, e1 = _epoch(order, 0), _epoch(order, 1)
    c0 = Counter(x for x in e0 if x[0] == 0)
    assert len(c0) == n0 and set(c0.values()) == {2}  # two full passes over source 0
    half0, half1 = [x for x in e0 if x[0] == 1], [x for x in e1 if x[0] == 1]
    assert len(half0) == len(half1) == 6
    assert sorted(half0 + half1) == sorted((1, s, i) for s, n in enumerate(SHARDS[1]) for i in range(n))


def test_a_global_batch_mixes_many_shards_and_sources():
    """200 shards of 50 samples in two folders: every batch of 64 draws from dozens of shards of both."""
    shards = [[50] * 100, [50] * 100]
    order = _order(shards, seed=7, global_batch_size=64)
    for k in range(order.batches_per_epoch):
        src, shard, _ = order.epoch(0).locate(np.arange(k * 64, (k + 1) * 64))
        assert len(set(zip(src.tolist(), shard.tolist()))) > 40 and set(src.tolist()) == {0, 1}


def test_any_dp_size_dividing_the_global_batch_is_valid():
    cfg = DataConfig(paths=["x"])
    for D in (1, 3, 5, 10, 20, 40, 48, 1000):
        validate_data_parallel(cfg, D, 1, 120 if 120 % D == 0 else 4 * D)
    with pytest.raises(ValueError, match=r"global_batch_size=12 must be a multiple of dp_size \* micro_batch_size"):
        validate_data_parallel(cfg, 5, 1, 12)
    with pytest.raises(ValueError, match="global_batch_size=12 must be a multiple"):
        validate_data_parallel(cfg, 2, 4, 12)


def test_states_of_the_virtual_stream_orders_are_refused_in_one_line():
    check_saved_order({"order": ORDER_NAME, "consumed_samples": 16})
    old = {"version": 1, "consumed_samples": 128, "virtual_streams": 8, "shuffle_window": 1024}  # Hippo 0.1
    for state in (old, {**old, "virtual_streams": 3072, "order_version": 2}):
        with pytest.raises(ValueError) as err:
            check_saved_order(state)
        msg = str(err.value)
        assert f"{state['virtual_streams']}-virtual-stream sample order" in msg and "\n" not in msg
        assert "Hippo 0.1.0 up to commit 9307dce" in msg


@pytest.mark.parametrize("kw, match", [
    (dict(paths=[]), "data.paths"),
    (dict(paths="folder"), "data.paths"),
    (dict(paths=["a", "b"], weights=[1.0]), "data.weights"),
    (dict(paths=["a"], weights=[0.0]), "data.weights"),
    (dict(paths=["a"], seed=-1), "data.seed"),
    (dict(paths=["a"], num_workers=-1), "data.num_workers"),
    (dict(paths=["a"], read_ahead=0), "data.read_ahead"),
    (dict(paths=["pipe:cat folder"]), r"data.paths: pipe:cat folder is a `pipe:` command.*HTTP"),
    (dict(paths=["a"], split="test"), "data.split"),
    (dict(paths=["a"], max_corrupt_fraction=1.5), "data.max_corrupt_fraction"),
    (dict(paths=["a"], max_corrupt_fraction="0.1"), "data.max_corrupt_fraction"),
])
def test_data_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)
