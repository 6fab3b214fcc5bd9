"""The global order as a pure function: permutations, bounded shuffle, mixtures, rank ownership, checks."""

from __future__ import annotations

from collections import Counter

import pytest

from hippo.data_pipeline.config import DataConfig, validate_data_parallel
from hippo.data_pipeline.sample_order import SampleOrder, supported_dp_sizes

SHARDS = [[7, 7, 7, 7, 7, 3], [5, 5, 2]]


def _layout(**kw) -> SampleOrder:
    args = dict(weights=[1.0], seed=3, virtual_streams=8, shuffle_window=4, global_batch_size=4)
    args.update(kw)
    return SampleOrder(kw.pop("shards", [SHARDS[0]]), **{k: v for k, v in args.items() if k != "shards"})


def _epoch(layout: SampleOrder, epoch: int) -> list[tuple[int, int, int]]:
    plan = layout.plan(epoch)
    return [plan.locate(g) for g in range(plan.total)]


def test_each_epoch_is_a_permutation_that_changes_with_epoch_and_seed():
    lay = _layout()
    all_samples = sorted((0, s, i) for s, n in enumerate(SHARDS[0]) for i in range(n))
    e0, e1 = _epoch(lay, 0), _epoch(lay, 1)
    assert sorted(e0) == all_samples and sorted(e1) == all_samples
    assert e0 != e1
    assert _epoch(_layout(seed=4), 0) != e0
    assert _epoch(_layout(), 0) == e0  # deterministic


def test_unshuffled_single_stream_is_manifest_order():
    lay = _layout(virtual_streams=1, shuffle=False)
    assert _epoch(lay, 0) == [(0, s, i) for s, n in enumerate(SHARDS[0]) for i in range(n)]


def test_in_stream_shuffle_is_bounded_by_the_window():
    lay = _layout(shuffle_window=4)
    plan = lay.plan(0)
    for v in range(plan.V):
        inputs = plan.pieces(plan.stream_start[v], plan.stream_start[v] + plan.stream_len[v])
        flat = [(seg.source, seg.shard, i) for seg in inputs for i in range(seg.start, seg.stop)]
        out = [plan.locate(j * plan.V + v) for j in range(plan.stream_len[v])]
        for j, sample in enumerate(out):
            assert flat.index(sample) // 4 == j // 4  # stays inside its block


def test_mixture_weights_are_passes_per_epoch():
    lay = SampleOrder(SHARDS, weights=[2.0, 0.5], seed=0, virtual_streams=4, shuffle_window=8, global_batch_size=2)
    n0, n1 = sum(SHARDS[0]), sum(SHARDS[1])
    assert lay.slots == [2 * n0, round(0.5 * n1)]
    e0, e1 = _epoch(lay, 0), _epoch(lay, 1)
    c0 = Counter(x for x in e0 if x[0] == 0)
    assert len(c0) == n0 and set(c0.values()) == {2}  # two full passes over source 0
    half0 = [x for x in e0 if x[0] == 1]
    half1 = [x for x in e1 if x[0] == 1]
    assert len(half0) == len(half1) == 6
    assert sorted(half0 + half1) == sorted((1, s, i) for s, n in enumerate(SHARDS[1]) for i in range(n))


def test_ranks_own_disjoint_streams_and_batches_do_not_depend_on_dp():
    lay = _layout(global_batch_size=8)
    plan = lay.plan(0)
    for D in (1, 2, 4, 8):
        for k in range(lay.batches_per_epoch):
            batch = range(k * 8, (k + 1) * 8)
            per_rank = [[g for g in batch if g % D == r] for r in range(D)]
            assert all(len(p) == 8 // D for p in per_rank)
            for r, gs in enumerate(per_rank):
                assert all((g % plan.V) % D == r for g in gs)  # only streams v % D == r
    assert lay.samples_per_epoch == 32 and lay.dropped_per_epoch == 6


def test_layout_checks_name_the_option():
    cfg = DataConfig(paths=["x"], virtual_streams=8)
    validate_data_parallel(cfg, 4, 2, 16)
    with pytest.raises(ValueError, match=r"virtual_streams=8.*\[1, 2, 4, 8\]"):
        validate_data_parallel(cfg, 3, 1, 12)
    with pytest.raises(ValueError, match="global_batch_size=12 must be a multiple"):
        validate_data_parallel(cfg, 2, 4, 12)
    assert supported_dp_sizes(12) == [1, 2, 3, 4, 6, 12]


@pytest.mark.parametrize("kw, match", [
    (dict(paths=[]), "data.paths"),
    (dict(paths="folder"), "data.paths"),
    (dict(paths=["a", "b"], weights=[1.0]), "data.weights"),
    (dict(paths=["a"], weights=[0.0]), "data.weights"),
    (dict(paths=["a"], seed=-1), "data.seed"),
    (dict(paths=["a"], num_workers=-1), "data.num_workers"),
    (dict(paths=["a"], virtual_streams=0), "data.virtual_streams"),
    (dict(paths=["a"], split="test"), "data.split"),
    (dict(paths=["a"], max_corrupt_fraction=1.5), "data.max_corrupt_fraction"),
    (dict(paths=["a"], max_corrupt_fraction="0.1"), "data.max_corrupt_fraction"),
])
def test_data_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kw)
