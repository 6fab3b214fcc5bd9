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
        slot = plan.slot_stream.index(v)
        out = [plan.locate(j * plan.V + slot) for j in range(plan.stream_len[v])]
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
                assert all((g % plan.V) % D == r for g in gs)  # only the streams of slots s % D == r
    assert lay.samples_per_epoch == 32 and lay.dropped_per_epoch == 6


def test_layout_checks_name_the_option():
    cfg = DataConfig(paths=["x"], virtual_streams=8)
    validate_data_parallel(cfg, 4, 2, 16)
    with pytest.raises(ValueError, match=r"virtual_streams=8.*\[1, 2, 4, 8\]"):
        validate_data_parallel(cfg, 3, 1, 12)
    with pytest.raises(ValueError, match="global_batch_size=12 must be a multiple"):
        validate_data_parallel(cfg, 2, 4, 12)
    assert supported_dp_sizes(12) == [1, 2, 3, 4, 6, 12]


CLUSTER_DP_SIZES = [2 ** a for a in range(11)] + [3, 6, 12, 24, 48, 96, 192, 384, 768]


def test_the_default_stream_count_admits_every_cluster_dp_size():
    """Every power of two up to 1024 and 3 x 2^a (12, 24, 48, 96, ...) pass with data left at its
    defaults; a DP size that is neither is refused by name, with the sizes that work."""
    cfg = DataConfig(paths=["x"])
    for D in CLUSTER_DP_SIZES:
        validate_data_parallel(cfg, D, 1, 4 * D)
    with pytest.raises(ValueError, match=r"data-parallel size 5 does not divide data.virtual_streams=3072; supported data-parallel sizes: \[1, 2, 3, 4, 6, 8, 12, 16, 24"):
        validate_data_parallel(cfg, 5, 1, 10)


def test_slots_shuffle_streams_per_epoch_and_version_1_keeps_the_old_interleave():
    """Order version 2 reads a permutation of the streams per epoch, so neighbours in the order
    come from unrelated streams even when streams hold one sample; version 1 is the old order."""
    shards = [[3] * 40]  # 120 samples
    kw = dict(weights=[1.0], seed=5, virtual_streams=64, shuffle_window=4, global_batch_size=8)
    v2, v1 = SampleOrder(shards, **kw), SampleOrder(shards, order_version=1, **kw)
    p0, p1 = v2.plan(0), v2.plan(1)
    assert sorted(p0.slot_stream) == list(range(64)) and p0.slot_stream != list(range(64))
    assert p0.slot_stream != p1.slot_stream
    assert v1.plan(0).slot_stream == list(range(64))
    for lay in (v1, v2):  # each epoch still reads every sample once
        epoch = [lay.locate(g) for g in range(lay.samples_per_epoch)]
        assert len(set(epoch)) == len(epoch) == lay.samples_per_epoch
    # Version 1 is the interleave of contiguous streams: sample g of stream g % V.
    plan = v1.plan(0)
    for g in range(v1.samples_per_epoch):
        v, j = g % 64, g // 64
        b = j // 4
        pos = plan.stream_start[v] + b * 4 + int(plan.block_permutation(v, b)[j - b * 4])
        (seg,) = plan.pieces(pos, pos + 1)
        assert v1.locate(g) == (seg.source, seg.shard, seg.start)


def test_unset_order_settings_come_from_the_checkpoint_else_the_defaults():
    cfg = DataConfig(paths=["x"])
    assert (cfg.resolved().virtual_streams, cfg.resolved().shuffle_window, cfg.resolved().order_version) == (3072, 4, 2)
    old_state = {"virtual_streams": 8, "shuffle_window": 1024, "consumed_samples": 16}  # before order_version
    r = cfg.resolved(old_state)
    assert (r.virtual_streams, r.shuffle_window, r.order_version) == (8, 1024, 1)
    explicit = DataConfig(paths=["x"], virtual_streams=16).resolved(old_state)
    assert explicit.virtual_streams == 16  # set by the user: kept (and refused by the stream if it differs)


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
