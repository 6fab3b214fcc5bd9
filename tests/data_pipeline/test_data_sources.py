"""Input reading: every bad record is reported with its reason and line; zstd damage is detected."""

from __future__ import annotations

import json

import pytest
import zstandard

from hippo.data_pipeline.sources import check_encoding, input_kind, iter_records


def _lines_file(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_records_are_reported_with_reason_and_line(tmp_path):
    lines = [
        json.dumps({"text": "good one", "meta": {"pile_set_name": "Pile-CC"}}).encode(),
        b'{"text": "unterminated',
        json.dumps({"meta": {}}).encode(),
        json.dumps({"text": 5}).encode(),
        b"",  # blank lines are not records
        json.dumps({"text": ""}).encode(),
        b'{"text": "bad \xff byte"}',
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps({"text": "good two"}).encode(),
        b"[1, 2]",
    ]
    recs = list(iter_records(_lines_file(tmp_path / "x.jsonl", lines)))
    got = [(r.line, r.skip_reason) for r in recs]
    assert got == [
        (1, None), (2, "malformed_json"), (3, "missing_text"), (4, "missing_text"), (6, "empty_text"),
        (7, "invalid_utf8"), (8, "invalid_utf8"), (9, None), (10, "missing_text"),
    ]
    assert recs[0].text == "good one" and recs[0].set_name == "Pile-CC"
    assert recs[7].text == "good two" and recs[7].set_name is None


def test_zstd_multi_frame_truncated_and_corrupt(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " * 20}).encode() for i in range(3000)]
    body = b"\n".join(lines) + b"\n"
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    half = len(body) // 2
    cut = body.rfind(b"\n", 0, half) + 1
    two_frames = cctx.compress(body[:cut]) + cctx.compress(body[cut:])
    (tmp_path / "ok.jsonl.zst").write_bytes(two_frames)
    recs = list(iter_records(tmp_path / "ok.jsonl.zst"))
    assert [r.text for r in recs] == [json.loads(x)["text"] for x in lines]

    one = cctx.compress(body)
    (tmp_path / "trunc.jsonl.zst").write_bytes(one[: len(one) * 2 // 3])
    recs = list(iter_records(tmp_path / "trunc.jsonl.zst"))
    good, last = recs[:-1], recs[-1]
    assert last.skip_reason == "truncated_zstd"
    assert all(r.skip_reason is None for r in good) and 0 < len(good) < 3000
    assert [r.text for r in good] == [json.loads(x)["text"] for x in lines[: len(good)]]
    assert last.line == len(good) + 1  # the line that was cut

    damaged = bytearray(one)
    for i in range(len(damaged) // 2, len(damaged) // 2 + 64):
        damaged[i] ^= 0x5A
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(damaged))
    recs = list(iter_records(tmp_path / "bad.jsonl.zst"))
    assert recs[-1].skip_reason == "corrupt_zstd"
    assert "rest of file skipped" in recs[-1].detail
    assert all(r.skip_reason is None for r in recs[:-1])


def test_txt_is_one_document_and_bad_utf8_names_line(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two ü\n", encoding="utf-8")
    (recs,) = list(iter_records(tmp_path / "a.txt"))
    assert recs.text == "line one\nline two ü\n"
    (tmp_path / "b.txt").write_bytes(b"fine\nfine\nbad \xc3\x28 here\n")
    (rec,) = list(iter_records(tmp_path / "b.txt"))
    assert (rec.skip_reason, rec.line) == ("invalid_utf8", 3)
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("zipped ü".encode()))
    assert [r.text for r in iter_records(tmp_path / "c.txt.zst")] == ["zipped ü"]


def test_start_line_skips_without_parsing(tmp_path):
    path = _lines_file(tmp_path / "x.jsonl", [b"{broken", json.dumps({"text": "a"}).encode(),
                                               json.dumps({"text": "b"}).encode()])
    assert [(r.line, r.text) for r in iter_records(path, start_line=2)] == [(2, "a"), (3, "b")]


def test_unsupported_input_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unsupported input type"):
        input_kind(tmp_path / "data.parquet")


def test_jsonl_lines_in_another_encoding_are_decoded_replaced_or_skipped(tmp_path):
    path = _lines_file(tmp_path / "l.jsonl", [b'{"text": "ok"}', '{"text": "déjà"}'.encode("latin-1")])
    assert [(r.line, r.skip_reason) for r in iter_records(path)] == [(1, None), (2, "invalid_utf8")]
    assert [r.text for r in iter_records(path, encoding="latin-1")] == ["ok", "déjà"]
    assert [r.text for r in iter_records(path, errors="replace")] == ["ok", "d\ufffdj\ufffd"]
    (rec,) = list(iter_records(path, start_line=2, encoding="ascii"))
    assert (rec.line, rec.skip_reason) == (2, "invalid_encoding") and "ascii" in rec.detail
    assert check_encoding("Latin-1", "strict", lines=True) == "iso8859-1"
    with pytest.raises(ValueError, match="--encoding utf-16"):
        check_encoding("utf-16", "strict", lines=True)  # jsonl is split at byte 0x0A
    assert check_encoding("utf-16", "replace", lines=False) == "utf-16"
