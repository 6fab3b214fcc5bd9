"""`hippo data ...` through `register` on a plain argparse parser, and the default corpus."""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from dp_helpers import byte_docs_from_tokens, make_docs, read_split, write_jsonl

from hippo.data_pipeline import cli
from hippo.data_pipeline.default_corpus import write_default_corpus
from hippo.data_pipeline.prepare import prepare


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hippo")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_prepare_inspect_verify_through_the_cli(tmp_path, capsys):
    docs = make_docs(120, seed=30)
    src = write_jsonl(tmp_path / "d.jsonl", docs, ["Pile-CC"])
    with open(src, "a") as f:
        f.write("{oops\n")
    out = tmp_path / "out"
    assert _run(["data", "prepare", str(src), "--output", str(out), "--seq-len", "32", "--shard-size", "8K",
                 "--val-fraction", "0.1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "skipped: malformed_json=1" in text and "train:" in text and "validation:" in text

    assert _run(["data", "inspect", str(out), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "Pile-CC" in text and f"{src}:121: malformed_json" in text
    first_window = bytes(read_split(out)[0][0][:20].tolist()).decode("utf-8", errors="replace")
    assert first_window in text

    assert _run(["data", "verify", str(out), "--no-progress"]) == 0
    assert ": OK" in capsys.readouterr().out
    shard = out / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[530] ^= 0xFF  # inside the first sample's compressed bytes (its header is bytes 0-511)
    shard.write_bytes(bytes(raw))
    assert _run(["data", "verify", str(out), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "PROBLEM train-000001.tar: sample 0" in text and "sha256" in text


def test_a_val_fraction_that_holds_out_nothing_says_so(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(20, seed=31), ["Pile-CC"])
    assert _run(["data", "prepare", str(src), "--output", str(tmp_path / "out"), "--seq-len", "32",
                 "--val-fraction", "0.0001", "--no-progress"]) == 0
    assert "validation: empty: the held-out records (--val-fraction 0.0001)" in capsys.readouterr().out


def test_cli_reports_bad_input_with_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"no": "text"}\n')
    assert _run(["data", "prepare", str(src), "-o", str(tmp_path / "o"), "--seq-len", "8", "--strict",
                 "--no-progress"]) == 2
    assert f"{src}:2: missing_text" in capsys.readouterr().err
    assert _run(["data", "inspect", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_train_tokenizer_command_then_prepare_with_it(tmp_path, capsys):
    docs = make_docs(150, seed=31)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    tok_path = tmp_path / "tok.json"
    assert _run(["data", "train-tokenizer", str(src), "-o", str(tok_path), "--vocab-size", "300"]) == 0
    assert "vocab" in capsys.readouterr().out
    assert _run(["data", "prepare", str(src), "-o", str(tmp_path / "o"), "--seq-len", "16",
                 "--tokenizer", str(tok_path), "--no-progress"]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["tokenizer"]["vocab_size"] <= 300 and (tmp_path / "o" / "tokenizer.json").exists()


def test_size_parser():
    assert cli.parse_size("4096") == 4096 and cli.parse_size("64K") == 65536
    assert cli.parse_size("1.5G") == 3 * (1 << 29) and cli.parse_size("256MiB") == 256 << 20
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_size("lots")


def test_default_corpus_is_the_stdlib_in_sorted_order(tmp_path):
    path = write_default_corpus(tmp_path / "corpus.jsonl", 300_000)
    assert 0 < path.stat().st_size <= 300_000
    again = write_default_corpus(tmp_path / "again.jsonl", 300_000)
    assert path.read_bytes() == again.read_bytes()
    root = Path(sysconfig.get_paths()["stdlib"])
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rels = [r["meta"]["path"] for r in recs]
    assert rels == sorted(rels)
    assert all(r["meta"]["pile_set_name"] == "python-stdlib" for r in recs)
    assert not any(part in ("site-packages", "test", "tests") for rel in rels for part in rel.split("/")[:-1])
    for r in recs[:5]:
        assert (root / r["meta"]["path"]).read_text(encoding="utf-8") == r["text"]
    info = json.loads((tmp_path / "corpus.jsonl.source.json").read_text())
    assert info["python_version"] == platform.python_version()

    m = prepare([path], tmp_path / "prepared", seq_len=256, val_fraction=0.1, progress=False)
    assert m.inputs[0]["info"]["python_version"] == info["python_version"]
    assert set(m.splits["train"].set_names) == {"python-stdlib"}
    tokens = np.concatenate([s for shard in read_split(tmp_path / "prepared") for s in shard] +
                            [s for shard in read_split(tmp_path / "prepared", "validation") for s in shard])
    assert sorted(byte_docs_from_tokens(tokens)) == sorted(r["text"] for r in recs)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("hippo: error:")]


@pytest.mark.parametrize("name,content,counts", [
    ("empty.jsonl", b"", "the inputs hold no records"),
    ("bad.jsonl", b'{"text": oops}\n{"meta": {}}\n{"text": ""}\n{oops\n',
     "every record was skipped (empty_text=1, malformed_json=2, missing_text=1; first: "),
    ("plain.jsonl.zst", b'{"text": "not compressed at all"}\n', "every record was skipped (corrupt_zstd=1; first: "),
])
def test_prepare_of_an_empty_dataset_fails_in_one_line_and_keeps_what_was_there(tmp_path, capsys, name, content,
                                                                                  counts):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "out"
    assert _run(["data", "prepare", str(src), "-o", str(out), "--seq-len", "8", "--no-progress"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert counts in line and str(src) in line and "nothing was written" in line
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))

    # Over a prepared folder (--overwrite): the empty run must not have removed it.
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(40, seed=33))
    assert _run(["data", "prepare", str(good), "-o", str(out), "--seq-len", "8", "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _run(["data", "prepare", str(src), "-o", str(out), "--seq-len", "8", "--overwrite",
                 "--no-progress"]) == 2
    assert len(_error_lines(capsys.readouterr().err)) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _run(["data", "verify", str(out), "--no-progress"]) == 0


def test_text_in_another_encoding_is_decoded_or_replaced_or_skipped_and_counted(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café naïve, ½ déjà vu\n".encode("latin-1"))
    good = tmp_path / "good.txt"
    good.write_text("plain ascii\n", encoding="utf-8")

    def docs(*opts: str) -> list[str]:
        out = tmp_path / "-".join(("out",) + opts)
        assert _run(["data", "prepare", str(good), str(latin), "-o", str(out), "--seq-len", "16", "--no-progress",
                     *opts]) == 0
        return byte_docs_from_tokens(np.concatenate([s for shard in read_split(out) for s in shard]))

    assert docs() == ["plain ascii\n"]  # --errors strict (default): the file is skipped ...
    assert "skipped: invalid_utf8=1" in capsys.readouterr().out  # ... and counted
    assert docs("--encoding", "latin-1") == ["plain ascii\n", "café naïve, ½ déjà vu\n"]
    replaced = docs("--errors", "replace")
    assert replaced == ["plain ascii\n", latin.read_bytes().decode("utf-8", errors="replace")]
    assert replaced[1].count("\ufffd") == 5 and replaced[1].startswith("caf\ufffd na")
    capsys.readouterr()
    assert _run(["data", "prepare", str(latin), "-o", str(tmp_path / "x"), "--seq-len", "16", "--no-progress",
                 "--encoding", "no-such-codec"]) == 2
    assert "--encoding no-such-codec" in capsys.readouterr().err


def test_inspect_and_verify_name_a_manifest_that_disagrees_with_its_shards(small_corpus, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_corpus[0], copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["seq_len"] = 16
    (copy / "manifest.json").write_text(json.dumps(m))
    assert _run(["data", "verify", str(copy), "--no-progress"]) == 1
    (problem,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM")]
    assert "says seq_len=16" in problem and "shards hold seq_len=32" in problem  # once, not once per sample
    assert _run(["data", "inspect", str(copy)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "says seq_len=16" in line and "train.seq_len=32" in line
