"""The training stream: order fidelity, DP/worker invariance, exact resume, mixtures, damage, the sample index."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from dp_helpers import byte_docs_from_tokens, make_docs, read_split, write_jsonl

from hippo.data_pipeline.config import DataConfig
from hippo.data_pipeline.errors import (CorruptDataError, CorruptShardError, DataExhaustedError, ManifestError,
                                        MissingSplitError)
from hippo.data_pipeline.prepare import prepare
from hippo.data_pipeline.stream import build_stream

B, MB = 16, 2


def _stream(paths, D=1, r=0, *, W=0, mb=MB, gb=B, **kw):
    cfg = DataConfig(paths=[str(p) for p in paths], num_workers=W, **kw)
    return build_stream(cfg, dp_rank=r, dp_size=D, micro_batch_size=mb, global_batch_size=gb)


def _global_batches(paths, D, n_batches, *, W=0, state=None, gb=B, mb=MB, **kw) -> list[np.ndarray]:
    """Global batches k = 0.. as (gb, T+1) arrays in global sample order, rebuilt from D ranks."""
    per_rank = []
    for r in range(D):
        s = _stream(paths, D, r, W=W, gb=gb, mb=mb, **kw)
        if state is not None:
            s.load_state_dict(state)
        it = iter(s)
        rows = []
        for _ in range(n_batches * gb // D // mb):
            rows.extend(next(it).numpy())
        per_rank.append(rows)
    out = []
    for k in range(n_batches):
        # Rank r's i-th sample of batch k is global sample k*gb + r + i*D.
        out.append(np.stack([per_rank[g % D][k * (gb // D) + g // D] for g in range(gb)]))
    return out


def _all_samples(folder, split="train") -> Counter:
    return Counter(s.tobytes() for shard in read_split(folder, split) for s in shard)


def test_batches_shape_and_stream_facts(small_corpus):
    folder, _ = small_corpus
    s = _stream([folder])
    batch = next(iter(s))
    assert batch.shape == (MB, 33) and str(batch.dtype) == "torch.int64"
    assert (s.seq_len, s.vocab_size, s.tokenizer_spec, s.eos_id) == (32, 257, "byte", 256)
    assert int(batch.max()) < 257
    assert s.state_dict()["consumed_samples"] == 0  # half a global batch is not consumed


def test_stream_follows_layout_and_covers_epoch_exactly_once(small_corpus):
    folder, _ = small_corpus
    s = _stream([folder])
    shards = read_split(folder)
    n_epoch = s.samples_per_epoch
    it = iter(s)
    rows = [r for _ in range(n_epoch // MB) for r in next(it).numpy()]
    for g, row in enumerate(rows):
        _, shard, idx = s.order.locate(g)
        assert np.array_equal(row, shards[shard][idx])
    everything = _all_samples(folder)
    got = Counter(r.astype(np.uint16).tobytes() for r in rows)
    assert not got - everything and sum((everything - got).values()) == s.dropped_per_epoch < B
    assert s.state_dict()["consumed_samples"] == n_epoch and s.epoch == 1


@pytest.mark.parametrize("D", [1, 2, 4])
def test_epoch_union_over_ranks_is_every_sample_once_and_batches_match_dp1(small_corpus, D):
    folder, _ = small_corpus
    s = _stream([folder])
    n = s.order.batches_per_epoch
    ref = _global_batches([folder], 1, n)
    got = _global_batches([folder], D, n)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))
    union = Counter(r.astype(np.uint16).tobytes() for b in got for r in b)
    everything = _all_samples(folder)
    assert not union - everything  # nothing twice, nothing foreign
    assert sum((everything - union).values()) == s.dropped_per_epoch < B  # only the partial batch is dropped


def test_every_dp_size_dividing_the_batch_reads_dp1s_batches_and_resumes_at_any_other(small_corpus):
    """DP 1, 3, 5, 10 and 40 (ranks simulated in one process) read exactly the global batches DP 1
    reads, and a DP-5 state continues identically at DP 40 and DP 1."""
    folder, _ = small_corpus
    gb, k, m = 120, 3, 3
    ref = _global_batches([folder], 1, k + m, gb=gb, mb=1)
    for D in (3, 5, 10, 40):
        got = _global_batches([folder], D, k + m, gb=gb, mb=1)
        assert all(np.array_equal(a, b) for a, b in zip(ref, got)), D
    s5 = _stream([folder], 5, 0, gb=gb, mb=1)
    it = iter(s5)
    for _ in range(k * gb // 5):
        next(it)
    assert s5.state_dict()["consumed_samples"] == k * gb
    for D in (40, 1):
        cont = _global_batches([folder], D, m, state=s5.state_dict(), gb=gb, mb=1)
        assert all(np.array_equal(a, b) for a, b in zip(cont, ref[k:])), D


def test_each_sample_is_one_positioned_read(small_corpus, monkeypatch):
    """Reading is one `os.pread` per sample handed over, and a few descriptors stay open."""
    import hippo.data_pipeline.sample_reader as reader_mod

    folder, _ = small_corpus
    reads, opened = [], []
    real_pread, real_open = reader_mod.os.pread, reader_mod.os.open
    monkeypatch.setattr(reader_mod.os, "pread", lambda fd, n, at: reads.append(n) or real_pread(fd, n, at))
    monkeypatch.setattr(reader_mod.os, "open", lambda *a: opened.append(a[0]) or real_open(*a))
    s = _stream([folder])
    it = iter(s)
    for _ in range(s.samples_per_epoch // MB):
        next(it)
    assert len(reads) == s.samples_per_epoch and max(reads) <= 2048  # one tar member (header + data) each
    assert len(set(opened)) == len(_shard_names(folder))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("D,W", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (2, 3)])
def test_worker_layouts_give_identical_global_batches(small_corpus, D, W):
    folder, _ = small_corpus
    n = _stream([folder]).order.batches_per_epoch
    ref = _global_batches([folder], 1, n)
    got = _global_batches([folder], D, n, W=W, samples_per_transfer=5)
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))
    union = Counter(r.astype(np.uint16).tobytes() for b in got for r in b)
    everything = _all_samples(folder)
    assert not union - everything and sum((everything - union).values()) < B


def test_resume_from_dp2_into_dp1_and_dp4_continues_exactly(small_corpus):
    folder, _ = small_corpus
    per_epoch = _stream([folder]).order.batches_per_epoch
    k, m = per_epoch - 5, 12  # the continuation crosses into the next epoch
    ref = _global_batches([folder], 1, k + m)

    # Two DP ranks train k steps; rank 0's state after step k is the checkpoint.
    s0 = _stream([folder], 2, 0)
    it = iter(s0)
    for _ in range(k * B // 2 // MB):
        next(it)
    state = s0.state_dict()
    assert state["consumed_samples"] == k * B

    for D in (1, 4):
        cont = _global_batches([folder], D, m, state=state)
        assert all(np.array_equal(a, b) for a, b in zip(cont, ref[k:]))


@pytest.mark.slow
def test_resume_with_workers(small_corpus):
    folder, _ = small_corpus
    k, m = 9, 6
    ref = _global_batches([folder], 1, k + m)
    s = _stream([folder], 2, 1, W=2, samples_per_transfer=3)
    it = iter(s)
    for _ in range(k * B // 2 // MB):
        next(it)
    state = s.state_dict()
    del it
    cont = _global_batches([folder], 4, m, W=2, state=state, samples_per_transfer=3)
    assert all(np.array_equal(a, b) for a, b in zip(cont, ref[k:]))


def test_resume_refuses_other_data_or_seed(small_corpus, second_corpus):
    folder, _ = small_corpus
    state = _stream([folder]).state_dict()
    with pytest.raises(ValueError, match="data.seed"):
        _stream([folder], seed=99).load_state_dict(state)
    with pytest.raises(ValueError, match="prepared data"):
        _stream([second_corpus[0]]).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _stream([folder], gb=32).load_state_dict(state)


def test_epochs_reshuffle_and_max_epochs_raises(small_corpus):
    folder, _ = small_corpus
    s = _stream([folder], max_epochs=2)
    n = s.samples_per_epoch // MB
    batches = list(_take_until_exhausted(s))
    assert len(batches) == 2 * n
    e0 = Counter(r.astype(np.uint16).tobytes() for b in batches[:n] for r in b.numpy())
    e1 = Counter(r.astype(np.uint16).tobytes() for b in batches[n:] for r in b.numpy())
    everything = _all_samples(folder)
    for e in (e0, e1):  # each epoch: distinct samples, all but the dropped partial batch
        assert not e - everything and sum((everything - e).values()) == s.dropped_per_epoch
    first = [r.tobytes() for r in batches[0].numpy()]
    assert first != [r.tobytes() for r in batches[n].numpy()]  # reshuffled


def _take_until_exhausted(s):
    it = iter(s)
    while True:
        try:
            yield next(it)
        except DataExhaustedError:
            return


def test_one_pass_eval_round_trips_documents_in_order_and_is_capped(small_corpus):
    folder, docs = small_corpus
    cfg = DataConfig(paths=[str(folder)])
    # Global batch 1: nothing is dropped, so the pass returns every window in manifest order.
    s = build_stream(cfg, dp_rank=0, dp_size=1, micro_batch_size=1, global_batch_size=1, one_pass=True)
    tokens = np.concatenate([b.numpy().reshape(-1) for b in s])
    ref = np.concatenate([x for shard in read_split(folder) for x in shard])
    assert np.array_equal(tokens, ref)
    assert byte_docs_from_tokens(tokens) == docs  # text -> prepare -> stream -> detokenize

    capped = build_stream(cfg, dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=4, one_pass=True,
                          max_batches=3)
    first = [b.numpy() for b in capped]
    again = [b.numpy() for b in capped]  # each pass starts from the beginning
    assert len(first) == 6 == len(capped)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert np.array_equal(np.concatenate(first).reshape(-1), ref[: 12 * 33])


def test_one_pass_eval_splits_over_ranks(small_corpus):
    folder, _ = small_corpus
    cfg = DataConfig(paths=[str(folder)])
    rows = Counter()
    for r in range(2):
        s = build_stream(cfg, dp_rank=r, dp_size=2, micro_batch_size=2, global_batch_size=8, one_pass=True)
        rows.update(x.astype(np.uint16).tobytes() for b in s for x in b.numpy())
    everything = _all_samples(folder)
    assert not rows - everything and sum((everything - rows).values()) == sum(everything.values()) % 8


def test_mixture_weights_dp_invariance_and_resume(small_corpus, second_corpus):
    a, b = small_corpus[0], second_corpus[0]
    kw = dict(weights=[1.0, 2.0])
    s = _stream([a, b], **kw)
    n = s.order.batches_per_epoch
    ref = _global_batches([a, b], 1, n, **kw)
    got = Counter(r.astype(np.uint16).tobytes() for x in ref for r in x)
    want = _all_samples(a) + _all_samples(b) + _all_samples(b)
    assert not got - want and sum((want - got).values()) == s.dropped_per_epoch
    two = _global_batches([a, b], 2, n, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(ref, two))
    cont = _global_batches([a, b], 4, 5, state={**s.state_dict(), "consumed_samples": 20 * B}, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(cont, ref[20:25]))


def test_validation_split_stream(tmp_path):
    docs = make_docs(200, seed=21)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    prepare([src], tmp_path / "out", seq_len=32, val_fraction=0.3, progress=False)
    s = _stream([tmp_path / "out"], split="validation", gb=4, mb=2)
    rows = Counter(r.astype(np.uint16).tobytes() for _, x in zip(range(4), s) for r in x.numpy())
    assert not rows - _all_samples(tmp_path / "out", "validation")


# ---------------------------------------------------------------- damaged shards


def _members(path):
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf]


def _rewrite(path, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


@pytest.fixture
def damaged_copy(small_corpus, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(small_corpus[0], dst)
    return dst


def _epoch_rows(folder, **kw):
    s = _stream([folder], **kw)
    it = iter(s)
    return [r for _ in range(s.samples_per_epoch // MB) for r in next(it).numpy()], s


def test_corrupt_sample_is_replaced_and_counted_or_raises_in_strict_mode(small_corpus, damaged_copy):
    clean, _ = _epoch_rows(small_corpus[0])
    shard = damaged_copy / "train-000003.tar"
    members = _members(shard)
    m, data = members[5]
    members[5] = (m, data[:20] + bytes(b ^ 0xFF for b in data[20:30]) + data[30:])  # checksum now fails
    _rewrite(shard, members)
    rows, s = _epoch_rows(damaged_copy)
    assert s.corrupt_samples == 1
    diff = [i for i, (a, b) in enumerate(zip(clean, rows)) if not np.array_equal(a, b)]
    assert len(diff) == 1 and len(rows) == len(clean)
    assert any(np.array_equal(rows[diff[0]], r) for r in clean)  # a copy of a real sample
    with pytest.raises(CorruptShardError, match="train-000003.tar"):
        _epoch_rows(damaged_copy, strict=True)


def test_truncated_and_garbled_shards_never_hang_and_are_counted(small_corpus, damaged_copy):
    clean, ref = _epoch_rows(small_corpus[0])
    shards = json.loads((damaged_copy / "manifest.json").read_text())["splits"]["train"]["shards"]
    t1 = damaged_copy / shards[2]["name"]
    t1.write_bytes(t1.read_bytes()[: 1024 * 10 + 300])  # 10 samples survive, then a cut member
    t2 = damaged_copy / shards[4]["name"]
    raw = bytearray(t2.read_bytes())
    raw[1024 * 20: 1024 * 20 + 512] = b"\x07" * 512  # the 21st member's header is garbage, the rest readable
    t2.write_bytes(bytes(raw))
    rows, s = _epoch_rows(damaged_copy, max_corrupt_fraction=1.0)  # far over the default budget
    assert len(rows) == len(clean)  # same number of batches: ranks stay in step

    def lost(g: int) -> bool:
        _, shard, idx = ref.order.locate(g)
        return (shard == 2 and idx >= 10) or (shard == 4 and idx == 20)

    used_lost = [g for g in range(len(rows)) if lost(g)]
    assert used_lost and all(np.array_equal(rows[g], clean[g]) for g in range(len(rows)) if not lost(g))
    assert s.corrupt_samples == len(used_lost)  # exactly the replaced samples handed over


@pytest.mark.slow
def test_damage_seen_by_dataloader_workers_is_replaced_identically_or_raises(damaged_copy):
    shard = damaged_copy / "train-000003.tar"
    members = _members(shard)
    m, data = members[5]
    members[5] = (m, data[:20] + bytes(b ^ 0xFF for b in data[20:30]) + data[30:])
    _rewrite(shard, members)
    in_process, s0 = _epoch_rows(damaged_copy)
    with_workers, s2 = _epoch_rows(damaged_copy, W=2, samples_per_transfer=4)
    assert all(np.array_equal(a, b) for a, b in zip(in_process, with_workers))
    assert s0.corrupt_samples == 1 == s2.corrupt_samples
    with pytest.raises(CorruptShardError, match="train-000003.tar"):  # raised in a worker, re-raised here
        _epoch_rows(damaged_copy, W=2, strict=True)


# ---------------------------------------------------------------- the corruption budget, manifest vs shards


def _garble(path, indices=None) -> None:
    """Flip bytes inside the zstd data of the given members (all if None): each fails its checksum."""
    members = _members(path)
    for i in range(len(members)) if indices is None else indices:
        m, data = members[i]
        members[i] = (m, data[:20] + bytes(b ^ 0xFF for b in data[20:30]) + data[30:])
    _rewrite(path, members)


def _shard_names(folder) -> list[str]:
    return [sh["name"] for sh in json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"]]


def _shard_read(folder, nth: int = 0) -> tuple[str, int]:
    """The nth distinct shard the order reads (0: that of global sample 0), and the index of its first sample read."""
    s, names = _stream([folder]), _shard_names(folder)
    seen: list[str] = []
    for g in range(s.samples_per_epoch):
        _, shard, idx = s.order.locate(g)
        name = names[shard]
        if name not in seen:
            seen.append(name)
            if len(seen) > nth:
                return name, idx
    raise AssertionError("the order reads fewer shards")


def _bad_positions(folder, shard_name: str) -> list[bool]:
    """Per global sample of epoch 0: does it come from `shard_name` (independent of the stream's counting)."""
    s, names = _stream([folder]), _shard_names(folder)
    return [names[s.order.locate(g)[1]] == shard_name for g in range(s.samples_per_epoch)]


@pytest.mark.parametrize("D,gb,mb,batches_before", [(1, 16, 2, 0), (2, 2, 1, 1)])
def test_unreadable_dataset_stops_within_the_first_global_batches(damaged_copy, D, gb, mb, batches_before):
    for shard in damaged_copy.glob("train-*.tar"):
        _garble(shard)
    s = _stream([damaged_copy], D, 0, mb=mb, gb=gb)
    handed = 0
    per_rank = gb // D
    with pytest.raises(CorruptDataError) as err:
        for _ in islice(s, 3 * per_rank // mb):  # bounded: before the budget, this trained on padding forever
            handed += 1
    # gb=2 over D=2 is one sample per rank and batch: the first is forgiven by max(1, ...), the second stops.
    assert s.consumed_samples == batches_before * gb and handed == (batches_before + 1) * per_rank // mb - 1
    msg = str(err.value)
    n = (batches_before + 1) * per_rank
    assert f"{n} of the {n} samples" in msg and "data.max_corrupt_fraction=0.001" in msg and "\n" not in msg
    assert "train-0000" in msg and str(damaged_copy) in msg
    assert s.corrupt_samples == n


@pytest.mark.parametrize("fraction", [0.001, 0.02, 0.1])
def test_damaged_shard_raises_exactly_when_over_budget_else_counts(damaged_copy, fraction):
    name, _ = _shard_read(damaged_copy, 1)  # met after some good batches: the fraction, not the floor, decides
    _garble(damaged_copy / name)
    bad = _bad_positions(damaged_copy, name)
    # The documented rule, computed independently: stop at the first batch where bad > max(1, fraction x samples).
    expected = next((k for k in range(len(bad) // B)
                     if sum(bad[:(k + 1) * B]) > max(1, int(fraction * (k + 1) * B))), None)
    assert (expected is None) == (fraction == 0.1) and not bad[0]  # the cases cover both outcomes
    s = _stream([damaged_copy], max_corrupt_fraction=fraction)
    it = iter(s)
    try:
        for _ in range(s.samples_per_epoch // MB):
            next(it)
    except CorruptDataError as e:
        assert expected is not None and s.consumed_samples == expected * B, "raised at the wrong batch"
        assert name in str(e) and f"{sum(bad[:(expected + 1) * B])} of the {(expected + 1) * B} samples" in str(e)
    else:
        assert expected is None, f"no error, expected one at batch {expected}"
        assert s.corrupt_samples == sum(bad) and s.corrupt_shards == [str(damaged_copy / name)]


def test_single_bad_sample_in_the_first_batch_is_forgiven(damaged_copy):
    name, idx = _shard_read(damaged_copy)
    _garble(damaged_copy / name, [idx])
    rows, s = _epoch_rows(damaged_copy)  # default budget: the whole epoch runs
    assert s.corrupt_samples == 1 and len(rows) == s.samples_per_epoch


@pytest.mark.parametrize("W", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_keeps_the_corrupt_count_exact(damaged_copy, W):
    name, _ = _shard_read(damaged_copy)
    _garble(damaged_copy / name)
    bad = _bad_positions(damaged_copy, name)
    k, m = 3, 5
    ref = _stream([damaged_copy], W=W, samples_per_transfer=5, max_corrupt_fraction=1.0)
    it = iter(ref)
    for _ in range(k * B // MB):
        next(it)
    state = ref.state_dict()
    assert state["corrupt_samples"] == sum(bad[:k * B]) > 0
    for _ in range(m * B // MB):
        next(it)
    del it  # its workers stop before the next stream's start
    resumed = _stream([damaged_copy], W=W, samples_per_transfer=5, max_corrupt_fraction=1.0)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for _ in range(m * B // MB):
        next(it2)
    assert resumed.corrupt_samples == ref.corrupt_samples == sum(bad[:(k + m) * B])
    assert resumed.corrupt_shards == [str(damaged_copy / name)]


@pytest.mark.parametrize("key,value", [("seq_len", 16), ("dtype", "uint32")])
def test_manifest_that_disagrees_with_its_shards_is_refused(damaged_copy, key, value):
    path = damaged_copy / "manifest.json"
    m = json.loads(path.read_text())
    m[key] = value
    path.write_text(json.dumps(m))
    with pytest.raises(ManifestError) as err:
        _stream([damaged_copy])
    msg = str(err.value)
    ours = f"seq_len={m['seq_len']} ({m['dtype']})"
    shards = "seq_len=32 (uint16)"  # what small_corpus was prepared with
    assert str(damaged_copy) in msg and f"manifest.json says {ours}" in msg and f"shards hold {shards}" in msg
    assert "hippo data prepare --overwrite" in msg and "train.seq_len=32" in msg
    # Not the "no such split" error a caller may treat as optional (no validation data):
    assert not isinstance(err.value, MissingSplitError)
    with pytest.raises(MissingSplitError):
        _stream([damaged_copy], split="validation")


def test_dataloader_workers_start_from_a_fork_server_not_a_fork_of_the_trainer(small_corpus, monkeypatch):
    """By the time the stream is iterated the trainer runs CUDA/NCCL/MLflow threads: a forked
    worker would inherit their half-held locks. Workers start from the fork server instead (and
    read the same rows: the worker-layout tests)."""
    import torch.utils.data

    seen = {}
    real = torch.utils.data.DataLoader

    class Recording(real):
        def __init__(self, *args, **kw):
            seen["context"] = kw.get("multiprocessing_context")
            super().__init__(*args, **kw)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    next(iter(_stream([small_corpus[0]], W=1)))
    assert seen["context"] is not None and seen["context"].get_start_method() == "forkserver"


# ---------------------------------------------------------------- the sample index


def test_a_damaged_or_missing_index_is_refused_and_hippo_data_index_rebuilds_it(small_corpus, damaged_copy):
    from hippo.data_pipeline.cli import main
    from hippo.data_pipeline.inspection import verify

    ref = _global_batches([small_corpus[0]], 1, 3)
    index = damaged_copy / "train.index"
    raw = bytearray(index.read_bytes())
    raw[100] ^= 0xFF
    index.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match=rf"train.index: sha256 differs.*hippo data index {damaged_copy}"):
        _stream([damaged_copy])
    assert any("train.index: sha256 differs" in p for p in verify(str(damaged_copy)).problems)

    manifest = damaged_copy / "manifest.json"  # as a folder prepared before the index existed
    m = json.loads(manifest.read_text())
    m["splits"]["train"].pop("index")
    manifest.write_text(json.dumps(m))
    index.unlink()
    with pytest.raises(ManifestError, match=rf"no sample index.*run `hippo data index {damaged_copy}` once"):
        _stream([damaged_copy])
    assert main(["data", "index", str(damaged_copy), "--no-progress"]) == 0
    assert verify(str(damaged_copy)).ok
    assert all(np.array_equal(a, b) for a, b in zip(ref, _global_batches([damaged_copy], 1, 3)))


def test_an_index_that_points_elsewhere_is_counted_as_damage_and_verify_names_it(damaged_copy):
    """An index consistent with its manifest entry but not with the shard (rewritten after
    indexing): the samples it misplaces do not decode, and are replaced and counted, never misread."""
    from hippo.data_pipeline.inspection import verify

    name, _ = _shard_read(damaged_copy)
    members = _members(damaged_copy / name)
    m0, data0 = members[0]
    _rewrite(damaged_copy / name, [(m0, data0 + bytes(600))] + members[1:])  # every later member moves
    problems = verify(str(damaged_copy)).problems
    assert any(name in p and "sample index's offsets differ" in p for p in problems)
    rows, s = _epoch_rows(damaged_copy, max_corrupt_fraction=1.0)
    bad = _bad_positions(damaged_copy, name)
    assert s.corrupt_samples == sum(bad) > 0 and s.corrupt_shards == [str(damaged_copy / name)]
