"""A self-contained export: the folder alone (moved anywhere) serves eval and generate, its weights
load through `HippoLM.from_pretrained`, large models are sharded with an index."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hippo.pretrain.cli import main
from hippo.pretrain.export import TOKENIZER_FILE, export_tokenizer, load_export, save_export
from hippo.pretrain.models import HippoLM, ModelConfig
from hippo.pretrain.models.pretrained import INDEX, WEIGHTS, load_weights, save_weights


def tiny_model(vocab: int = 257) -> HippoLM:
    return HippoLM(ModelConfig(vocab_size=vocab, d_model=16, n_layer=2, n_head=2, attn_layer_idx=[1]), seed=3)


def test_from_pretrained_gives_back_the_saved_model(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m", step=7)
    loaded = HippoLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 257, (2, 12))
    assert torch.equal(model.eval()(ids), loaded(ids))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["step"] == 7


def test_weights_above_the_shard_size_are_sharded_with_an_index(tmp_path):
    tensors = {f"w{i}": torch.randn(256) for i in range(5)}  # 1 KiB each
    save_weights(tmp_path, tensors, max_shard_bytes=2048)
    index = json.loads((tmp_path / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (tmp_path / WEIGHTS).exists()
    assert index["metadata"]["total_size"] == 5 * 1024
    loaded = load_weights(tmp_path)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    save_weights(tmp_path, tensors)  # one file again: the index goes, so nothing stale is read
    assert (tmp_path / WEIGHTS).exists() and not (tmp_path / INDEX).exists()


def test_a_moved_export_with_a_tokenizer_json_still_evaluates_and_generates(train_data, tmp_path, capsys):
    """The tokenizer is copied into the export: deleting the training data folder and moving the
    export elsewhere keeps `hippo generate` working."""

    from hippo.data_pipeline.tokenizer import load_tokenizer, train_bpe_tokenizer

    tok_file = tmp_path / "bpe.json"
    docs = ["state space hippo shift kernel token model " * 3] * 40
    train_bpe_tokenizer(docs, tok_file, vocab_size=300, min_frequency=1)
    data = tmp_path / "data"
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": "state space hippo model"}) + "\n" for _ in range(50)))
    from hippo.data_pipeline.prepare import prepare

    prepare([tmp_path / "docs.jsonl"], data, tokenizer=str(tok_file), seq_len=8, progress=False)
    expected = load_tokenizer(str(tok_file)).encode("state space")
    model = tiny_model(vocab=304)
    save_export(tmp_path / "export", dict(model.named_parameters()), model.cfg, tokenizer=str(data), step=1)
    assert (tmp_path / "export" / TOKENIZER_FILE).exists()
    moved = tmp_path / "elsewhere" / "export"
    shutil.move(str(tmp_path / "export"), moved)
    shutil.rmtree(data)
    tok_file.unlink()
    _, meta = load_export(moved)
    assert export_tokenizer(moved, meta).encode("state space") == expected
    assert main(["generate", str(moved), "--prompt", "state", "--max-new-tokens", "4", "--greedy"]) == 0
    assert "--- sample 1" in capsys.readouterr().out


def test_an_export_of_the_byte_tokenizer_needs_no_file(tmp_path):
    model = tiny_model()
    save_export(tmp_path / "e", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    _, meta = load_export(tmp_path / "e")
    assert meta["tokenizer"] == "byte" and export_tokenizer(tmp_path / "e", meta).vocab_size == 257


@pytest.mark.slow
def test_init_from_an_export_starts_every_layout_from_its_weights(train_data, tmp_path):
    """`hippo train --init-from EXPORT` on one process and at TP 2: both start from the export's
    weights (not the seeded init) with a fresh optimizer; at a negligible learning rate the
    end-of-run exports still equal the starting weights, and the first losses agree."""
    from safetensors.torch import load_file

    from hippo.pretrain.config import load_config
    from tests.helpers import BASE, hippo_train, losses

    cfg = load_config("tiny_hybrid", [o for o in BASE if o.startswith("model.")])
    start = HippoLM(cfg.model, seed=77)
    save_export(tmp_path / "start", dict(start.named_parameters()), cfg.model, tokenizer=str(train_data), step=0)
    runs = {}
    for name, nproc, layout in (("single", 0, []), ("tp2", 2, ["parallel.tensor=2"])):
        runs[name] = tmp_path / name
        hippo_train(runs[name], train_data, "train.steps=2", "optim.lr=1e-12", "tracking.enabled=false", *layout,
                    "--init-from", str(tmp_path / "start"), nproc=nproc)
    expected = dict(start.named_parameters())
    seeded = dict(HippoLM(cfg.model, seed=0).named_parameters())
    for run in runs.values():
        got = load_file(str(run / "export" / "model.safetensors"))
        assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
        assert not torch.allclose(got["embedding.word.weight"], seeded["embedding.word.weight"], atol=1e-3)
    assert losses(runs["single"]) == pytest.approx(losses(runs["tp2"]), rel=1e-5)

    other = HippoLM(load_config("tiny_hybrid", ["model.d_model=64"]).model, seed=1)
    save_export(tmp_path / "wide", dict(other.named_parameters()), other.cfg, tokenizer=str(train_data), step=0)
    refused = hippo_train(tmp_path / "refused", train_data, "--init-from", str(tmp_path / "wide"), check=False)
    assert refused.returncode == 2 and "model.d_model: 64 (export) vs 32" in refused.stderr


def test_generate_takes_a_file_of_prompts_in_batches_and_keeps_their_order(tmp_path, capsys):
    """Batched greedy continuations equal one-by-one ones (prompts of a batch share a length, so
    nothing is padded), in the file's order."""
    model = tiny_model()
    save_export(tmp_path / "e", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    prompts = ["def a", "import os", "def b", "x = 1"]  # three of 5 bytes: one batch of 3
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    argv = ["generate", str(tmp_path / "e"), "--greedy", "--max-new-tokens", "5", "--device", "cpu"]
    assert main([*argv, "--prompts", str(tmp_path / "prompts.txt"), "--batch-size", "3"]) == 0
    batched = capsys.readouterr().out
    singles = []
    for p in prompts:
        assert main([*argv, "--prompt", p]) == 0
        singles.append(capsys.readouterr().out.split("\n", 1)[1])
    blocks = batched.split("--- prompt ")[1:]
    assert [b.split("\n", 1)[1] for b in blocks] == singles
    assert [b.split(",")[0] for b in blocks] == ["1", "2", "3", "4"]


def flip_bytes(path, count: int = 100) -> None:
    """Overwrite `count` bytes in the middle of the file: its size does not change."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(255 - b for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def test_a_damaged_or_truncated_export_is_refused_by_every_loader_naming_the_file(tmp_path):
    """100 flipped bytes in the weights were once used silently (loss 3.1303 vs 3.1300), a
    truncated file gave a 29-line SafetensorError naming no file: every way of loading an export
    (from_pretrained for eval/generate, weight_reader for --init-from, load_weights for the H3
    export) now checks the recorded sizes and SHA-256 first."""
    from hippo.pretrain.models.pretrained import RECORD, ModelFolderError, weight_reader

    model = tiny_model()
    save_export(tmp_path / "e", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    recorded = json.loads((tmp_path / "e" / RECORD).read_text())["files"]
    assert sorted(recorded) == ["config.json", "model.safetensors"]
    HippoLM.from_pretrained(tmp_path / "e")
    flip_bytes(tmp_path / "e" / WEIGHTS)
    for load in (HippoLM.from_pretrained, weight_reader, load_weights):
        with pytest.raises(ModelFolderError, match=f"{tmp_path / 'e'}: model.safetensors does not match its SHA-256"):
            load(tmp_path / "e")
    (tmp_path / "e" / WEIGHTS).write_bytes((tmp_path / "e" / WEIGHTS).read_bytes()[:100])
    with pytest.raises(ModelFolderError, match=r"model.safetensors has 100 bytes, its record says \d+"):
        load_export(tmp_path / "e")


def test_an_export_written_before_records_loads_with_one_warning(tmp_path, caplog):
    from hippo.pretrain.models.pretrained import RECORD

    model = tiny_model()
    save_export(tmp_path / "old", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    (tmp_path / "old" / RECORD).unlink()
    with caplog.at_level("WARNING"):
        load_export(tmp_path / "old")
        load_export(tmp_path / "old")
    warnings = [r.getMessage() for r in caplog.records if RECORD in r.getMessage()]
    assert len(warnings) == 1 and "not verified" in warnings[0]
