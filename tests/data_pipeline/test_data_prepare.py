"""prepare: exact round trip, manifest accounting, splits, strict mode, resumable runs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from dp_helpers import byte_docs_from_tokens, make_docs, read_shard_samples, read_split, write_jsonl
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers

import hippo.data_pipeline.prepare as prep
from hippo.data_pipeline.errors import BadRecordError
from hippo.data_pipeline.prepare import prepare
from hippo.data_pipeline.tokenizer import load_tokenizer, train_bpe_tokenizer


def _tokens(folder, split="train") -> np.ndarray:
    return np.concatenate([s for shard in read_split(folder, split) for s in shard])


def test_round_trip_gives_back_documents_in_order(tmp_path):
    docs = make_docs(300, seed=5)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    m = prepare([src], tmp_path / "out", tokenizer="byte", seq_len=32, shard_bytes=20_000, progress=False)
    shards = read_split(tmp_path / "out")
    assert all(len(s) == 33 for shard in shards for s in shard)
    assert [len(x) for x in shards] == [sh.samples for sh in m.splits["train"].shards]
    toks = _tokens(tmp_path / "out")
    assert byte_docs_from_tokens(toks) == docs
    total = sum(len(d.encode()) + 1 for d in docs)
    assert m.splits["train"].tokens == total
    assert m.splits["train"].pad_tokens == len(toks) - total < 33
    assert m.splits["train"].samples == len(toks) // 33
    assert m.dtype == "uint16" and m.seq_len == 32


def test_manifest_counts_sources_checksums_and_skips(tmp_path):
    a = make_docs(80, seed=6)
    b = make_docs(50, seed=7)
    pa = write_jsonl(tmp_path / "a.jsonl", a, ["Pile-CC", "Github"])
    pb = tmp_path / "b.jsonl"
    with open(pb, "w") as f:
        for i, t in enumerate(b):
            f.write(json.dumps({"text": t, "meta": {"pile_set_name": "Github"}}) + "\n")
            if i == 10:
                f.write('{"text": oops}\n')          # line 12
            if i == 20:
                f.write('{"meta": {}}\n')            # line 23
    m = prepare([pa, pb], tmp_path / "out", tokenizer="byte", seq_len=64, shard_bytes=30_000, progress=False)
    tr = m.splits["train"]

    def ntok(docs):
        return sum(len(d.encode()) + 1 for d in docs)

    assert tr.sources[str(pa)] == {"documents": 80, "tokens": ntok(a)}
    assert tr.sources[str(pb)] == {"documents": 50, "tokens": ntok(b)}
    assert tr.set_names["Pile-CC"]["tokens"] == ntok(a[0::2])
    assert tr.set_names["Github"]["tokens"] == ntok(a[1::2]) + ntok(b)
    assert tr.skipped == {"malformed_json": 1, "missing_text": 1}
    assert [(e["file"], e["line"], e["reason"]) for e in tr.skipped_examples] == [
        (str(pb), 12, "malformed_json"), (str(pb), 23, "missing_text")]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["tokenizer"]["vocab_size"] == 257 and on_disk["tokenizer"]["name"] == "byte"
    for sh in tr.shards:
        data = (tmp_path / "out" / sh.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (sh.bytes, sh.sha256)
        assert len(read_shard_samples(tmp_path / "out" / sh.name)) == sh.samples


def test_strict_mode_names_file_and_line(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": \n')
    with pytest.raises(BadRecordError, match=r"s\.jsonl:3: malformed_json"):
        prepare([src], tmp_path / "out", seq_len=8, strict=True, progress=False)


def test_split_by_fraction_and_by_file(tmp_path):
    docs = make_docs(400, seed=8)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    m = prepare([src], tmp_path / "frac", seq_len=32, val_fraction=0.2, progress=False)
    train = byte_docs_from_tokens(_tokens(tmp_path / "frac", "train"))
    val = byte_docs_from_tokens(_tokens(tmp_path / "frac", "validation"))
    assert sorted(train + val) == sorted(docs)
    assert 40 <= len(val) <= 120
    # Each split keeps input order.
    assert train == [d for d in docs if d in set(train)] and val == [d for d in docs if d in set(val)]
    assert m.splits["validation"].documents == len(val)

    held = make_docs(30, seed=9)
    vsrc = write_jsonl(tmp_path / "held.jsonl", held)
    m2 = prepare([src], tmp_path / "byfile", seq_len=32, val_inputs=[vsrc], progress=False)
    assert byte_docs_from_tokens(_tokens(tmp_path / "byfile", "validation")) == held
    assert byte_docs_from_tokens(_tokens(tmp_path / "byfile", "train")) == docs
    assert [i["split"] for i in m2.inputs] == ["train", "validation"]


def test_hf_tokenizer_is_copied_and_round_trips(tmp_path):
    docs = make_docs(120, seed=10)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    tok = train_bpe_tokenizer(iter(docs), tmp_path / "bpe.json", vocab_size=300)
    m = prepare([src], tmp_path / "out", tokenizer=str(tmp_path / "bpe.json"), seq_len=16, progress=False)
    assert m.tokenizer["hash"] == tok.identity_hash and m.tokenizer["file"] == "tokenizer.json"
    again = load_tokenizer(str(tmp_path / "out"))  # a prepared folder names its own tokenizer
    assert again.identity_hash == tok.identity_hash
    ids = _tokens(tmp_path / "out").tolist()
    pieces, cur = [], []
    for t in ids:
        if t == tok.eos_id:
            if cur:
                pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert pieces == docs

    from hippo.data_pipeline.config import DataConfig
    from hippo.data_pipeline.stream import build_stream

    stream = build_stream(DataConfig(paths=[str(tmp_path / "out")]), dp_rank=0, dp_size=1, micro_batch_size=2,
                          global_batch_size=2)
    assert stream.vocab_size == tok.vocab_size and stream.eos_id == tok.eos_id
    assert load_tokenizer(stream.tokenizer_spec).identity_hash == tok.identity_hash  # the trainer's check


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    hf = HFTok(models.WordLevel(vocab, unk_token="w0"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "big.json"))
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(i % 50 + 1)) for i in range(60)]
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    m = prepare([src], tmp_path / "out", tokenizer=str(tmp_path / "big.json"), seq_len=16, progress=False)
    assert m.dtype == "uint32"
    ids = _tokens(tmp_path / "out").tolist()
    assert max(ids) == 70_000 and max(t for t in ids if t != 70_000) > 65_535
    expected = [i for d in docs for i in [int(w[1:]) for w in d.split()] + [70_000]]
    assert ids[: len(expected)] == expected


def _crash_after(monkeypatch, n_shards: int) -> None:
    real = prep._Run._finish_shard
    calls = {"n": 0}

    def finish(self, split):
        real(self, split)
        calls["n"] += 1
        if calls["n"] == n_shards:
            # Leave a half-written shard behind, as a killed process would.
            (self.out / "train-999999.tar.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(prep._Run, "_finish_shard", finish)


def test_interrupted_run_resumes_and_redoes_only_unfinished_shards(tmp_path, monkeypatch):
    docs = make_docs(500, seed=11)
    src = tmp_path / "d.jsonl"
    with open(src, "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"text": t, "meta": {"pile_set_name": "S" + str(i % 2)}}) + "\n")
            if i % 97 == 0:
                f.write("not json\n")
    kw = dict(tokenizer="byte", seq_len=32, shard_bytes=12_000, val_fraction=0.15, progress=False)
    ref = prepare([src], tmp_path / "ref", **kw)

    with monkeypatch.context() as mp:
        _crash_after(mp, 7)
        with pytest.raises(KeyboardInterrupt):
            prepare([src], tmp_path / "out", **kw)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert len(finished) == 7
    stamps = {n: os.stat(out / n).st_mtime_ns for n in finished}

    written = {"n": 0}
    real_add = prep.ShardWriter.add

    def counting_add(self, window):
        written["n"] += 1
        real_add(self, window)

    monkeypatch.setattr(prep.ShardWriter, "add", counting_add)
    m = prepare([src], out, **kw)
    assert m.to_dict()["splits"] == ref.to_dict()["splits"]  # shards, checksums, counts, skips
    assert {n: os.stat(out / n).st_mtime_ns for n in finished} == stamps  # finished shards untouched
    total = sum(s.samples for s in ref.splits.values())
    done_before = sum(sh.samples for s in ref.splits.values() for sh in s.shards if sh.name in stamps)
    assert written["n"] == total - done_before
    assert not list(out.glob("*.tmp")) and not (out / prep.JOURNAL_NAME).exists()


def test_rerun_is_a_no_op_and_different_options_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(50, seed=12))
    m1 = prepare([src], tmp_path / "out", seq_len=32, progress=False)
    src.write_bytes(src.read_bytes())  # rewritten, identical (a quick start run twice): still a no-op
    m2 = prepare([src], tmp_path / "out", seq_len=32, progress=False)
    assert m1.to_dict() == m2.to_dict()
    with open(src, "a") as f:
        f.write('{"text": "one more"}\n')
    with pytest.raises(FileExistsError, match="inputs"):
        prepare([src], tmp_path / "out", seq_len=32, progress=False)
    with pytest.raises(FileExistsError, match="seq_len"):
        prepare([src], tmp_path / "out", seq_len=64, progress=False)
    m3 = prepare([src], tmp_path / "out", seq_len=64, overwrite=True, progress=False)
    assert m3.splits["train"].documents == 51
    assert m3.seq_len == 64 and len(read_shard_samples(tmp_path / "out" / "train-000000.tar")[0]) == 65


@pytest.mark.slow
def test_worker_processes_give_identical_shards(tmp_path):
    docs = make_docs(400, seed=13)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    kw = dict(tokenizer="byte", seq_len=32, shard_bytes=20_000, val_fraction=0.1, progress=False, docs_per_batch=16)
    one = prepare([src], tmp_path / "one", workers=1, **kw)
    two = prepare([src], tmp_path / "two", workers=2, **kw)
    assert one.to_dict()["splits"] == two.to_dict()["splits"]


def test_shard_headers_match_tarfile_and_auto_shard_size(tmp_path):
    import tarfile

    from hippo.data_pipeline.shard_io import ustar_header

    for name, size in [("train-000001-00000042.u16.zst", 123), ("validation-000123-00001234.u32.zst", 99_999)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        assert ustar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)
    small = write_jsonl(tmp_path / "s.jsonl", make_docs(10))
    assert prep.auto_shard_bytes([small]) == 1 << 20
    big = tmp_path / "big.jsonl.zst"
    with open(big, "wb") as f:
        f.truncate(40 << 30)  # sparse: 40 GiB of (pretend) Pile
    assert prep.auto_shard_bytes([big]) == 256 << 20


def test_shard_writer_output_reads_back_with_tarfile_and_webdataset(tmp_path):
    """Hippo writes tar headers and padding itself (shard_io): tarfile and webdataset read exactly what it wrote."""
    import hashlib
    import tarfile

    import webdataset as wds
    import zstandard

    from hippo.data_pipeline.shard_io import ShardWriter

    rng = np.random.default_rng(0)
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)  # the writer's settings (level passed below)
    # One window whose zstd frame fills whole 512-byte blocks (no padding before the next header).
    for alphabet in range(2, 5000):
        aligned = rng.integers(0, alphabet, 1025).astype(np.uint16)
        if len(cctx.compress(aligned.tobytes())) % 512 == 0:
            break
    u16 = [rng.integers(0, a, n).astype(np.uint16) for a, n in ((1, 33), (300, 1025), (65536, 1025))]
    u16.insert(2, aligned)
    u32 = [rng.integers(0, 1 << 20, n).astype(np.uint32) for n in (33, 257, 1025)]
    dctx = zstandard.ZstdDecompressor()
    for name, dtype, ext, windows in (("train-000003.tar", np.uint16, "u16.zst", u16),
                                      ("validation-000000.tar", np.uint32, "u32.zst", u32)):
        w = ShardWriter(tmp_path, name, dtype, level=3)
        for window in windows:
            w.add(window)
        info = w.close()
        path = tmp_path / name
        stem = name.removesuffix(".tar")
        keys = [f"{stem}-{i:08d}" for i in range(len(windows))]
        raw = path.read_bytes()
        assert (info.samples, info.bytes, info.sha256) == (len(windows), len(raw), hashlib.sha256(raw).hexdigest())

        with tarfile.open(path, "r:") as tf:  # plain tar; a bad header ends tarfile's member list early
            members = tf.getmembers()
            assert [m.name for m in members] == [f"{k}.{ext}" for k in keys]
            assert all(m.isreg() and (m.mode, m.mtime, m.uid, m.gid) == (0o644, 0, 0, 0) for m in members)
            tar_data = [tf.extractfile(m).read() for m in members]
        assert [m.size for m in members] == [len(d) for d in tar_data]
        if dtype is np.uint16:
            assert any(m.size % 512 == 0 for m in members), "no sample filled whole blocks: the search above broke"
        # Layout: a header and whole 512-byte blocks per member, then the two-block end-of-archive marker.
        assert len(raw) == sum(512 + -(-m.size // 512) * 512 for m in members) + 1024
        assert raw[-1024:] == bytes(1024)

        samples = list(wds.WebDataset(str(path), shardshuffle=False))
        assert [s["__key__"] for s in samples] == keys
        assert all(set(s) - {"__key__", "__url__", "__local_path__"} == {ext} for s in samples)
        assert [s[ext] for s in samples] == tar_data
        for data, window in zip(tar_data, windows):  # the stored frames carry a content checksum
            assert zstandard.get_frame_parameters(data).has_checksum
            got = np.frombuffer(dctx.decompress(data), dtype=dtype)
            assert got.dtype == window.dtype and np.array_equal(got, window)


def test_pile_style_zstd_inputs_keep_subsets_and_report_truncation(tmp_path):
    import zstandard

    docs = make_docs(90, seed=14)
    names = ["Pile-CC", "PubMed Central", "Github"]
    lines = [json.dumps({"text": t, "meta": {"pile_set_name": names[i % 3]}}) for i, t in enumerate(docs)]
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    (tmp_path / "00.jsonl.zst").write_bytes(cctx.compress(("\n".join(lines[:60]) + "\n").encode()))
    whole = cctx.compress(("\n".join(lines[60:]) + "\n").encode())
    (tmp_path / "01.jsonl.zst").write_bytes(whole[: len(whole) - 40])  # a download cut short
    m = prepare([tmp_path], tmp_path / "out", seq_len=32, progress=False)  # a folder of inputs
    tr = m.splits["train"]
    assert [Path(i["path"]).name for i in m.inputs] == ["00.jsonl.zst", "01.jsonl.zst"]
    assert tr.skipped == {"truncated_zstd": 1}
    (ex,) = tr.skipped_examples
    assert ex["file"].endswith("01.jsonl.zst") and ex["reason"] == "truncated_zstd"
    got = byte_docs_from_tokens(_tokens(tmp_path / "out"))
    assert got == docs[: len(got)] and len(got) == 60 + ex["line"] - 1  # everything before the cut
    for i, name in enumerate(names):
        assert tr.set_names[name]["tokens"] == sum(len(d.encode()) + 1 for d in got[i::3])
