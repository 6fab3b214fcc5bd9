"""Failures a user can cause end in one `hippo: error:` line naming the file or option; --debug shows
the traceback. Each case runs `hippo` in-process on inputs built here (no training)."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hippo.data_pipeline.errors import ManifestError
from hippo.data_pipeline.manifest import load_manifest
from hippo.data_pipeline.prepare import prepare
from hippo.data_pipeline.tokenizer import ByteTokenizer, train_bpe_tokenizer
from hippo.pretrain.cli import main
from hippo.pretrain.export import save_export
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.pretrained import RECORD
from tests.helpers import ROOT, text_document

BAD_YAML = ["model:", "  d_model: 64", "    n_layer: 2", "train:", "  steps: 3"]
BAD_YAML_LINE = 3  # the over-indented line above


@dataclass(frozen=True)
class Inputs:
    root: Path
    byte_data: Path
    bpe_data: Path
    byte_model: Path
    """An export inside a run folder (`<run>/export`), tokenizer: the byte data."""
    bpe_model: Path
    small_model: Path
    """Vocabulary 64; its tokenizer (a deleted training folder) no longer loads."""
    no_shard: Path
    garbage_manifest: Path
    bad_yaml: Path


def _export(folder: Path, vocab_size: int, tokenizer: str) -> Path:
    model = HippoLM(ModelConfig(vocab_size=vocab_size, d_model=16, n_layer=1, n_head=1, d_state=4))
    if Path(tokenizer).exists():
        return save_export(folder, model.state_dict(), model.cfg, tokenizer=tokenizer, step=0)
    # As exports were written before they held a copy of their tokenizer (or a record of their
    # files): a reference to the training data folder, here one that no longer exists.
    save_export(folder, model.state_dict(), model.cfg, tokenizer="byte", step=0)
    meta = json.loads((folder / "config.json").read_text())
    meta.pop("tokenizer_info")
    (folder / "config.json").write_text(json.dumps({**meta, "tokenizer": tokenizer}))
    (folder / RECORD).unlink()
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("cli_errors")
    rng = random.Random(0)
    docs = [text_document(rng) for _ in range(80)]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    byte_data, bpe_data = root / "byte_data", root / "bpe_data"
    prepare([corpus], byte_data, tokenizer="byte", seq_len=16, val_fraction=0.2, progress=False)
    bpe = train_bpe_tokenizer(docs, root / "bpe.json", vocab_size=280, min_frequency=1)
    prepare([corpus], bpe_data, tokenizer=str(root / "bpe.json"), seq_len=16, val_fraction=0.2, progress=False)

    no_shard = root / "no_shard"
    shutil.copytree(byte_data, no_shard)
    (no_shard / load_manifest(str(no_shard)).split("validation").shards[0].name).unlink()
    garbage = root / "garbage_manifest"
    shutil.copytree(byte_data, garbage)
    (garbage / "manifest.json").write_text('{"format": "hippo-token-shards", "splits": ')
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("\n".join(BAD_YAML) + "\n")
    return Inputs(
        root=root, byte_data=byte_data, bpe_data=bpe_data,
        byte_model=_export(root / "run" / "export", ByteTokenizer().vocab_size, str(byte_data)),
        bpe_model=_export(root / "bpe_model", bpe.vocab_size, str(bpe_data)),
        small_model=_export(root / "small_model", 64, str(root / "deleted_training_data")),
        no_shard=no_shard, garbage_manifest=garbage, bad_yaml=bad_yaml,
    )


def _hash(data: Path) -> str:
    return load_manifest(str(data)).tokenizer["hash"]


def _missing_shard(i: Inputs) -> str:
    shard = load_manifest(str(i.no_shard)).split("validation").shards[0].name
    assert not (i.no_shard / shard).exists()
    return shard


def _unexported_run(i: Inputs) -> Path:
    """A training run folder that has checkpoints but no export (stopped before its end)."""
    run = i.root / "unexported_run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run


def _damaged_export(i: Inputs) -> Path:
    """A copy of an export with 100 bytes of its weights flipped in place (the size is unchanged)."""
    folder = i.root / "damaged_export"
    if not folder.exists():
        shutil.copytree(i.bpe_model, folder)
        data = bytearray((folder / "model.safetensors").read_bytes())
        middle = len(data) // 2
        data[middle:middle + 100] = bytes(255 - b for b in data[middle:middle + 100])
        (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


def _truncated_export(i: Inputs) -> Path:
    folder = i.root / "truncated_export"
    if not folder.exists():
        shutil.copytree(i.byte_model, folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return folder


# (id, argv, exit code, what the line must name); argv and names are built from the inputs.
CASES = [
    ("yaml-syntax", lambda i: ["params", str(i.bad_yaml)], 2,
     lambda i: [str(i.bad_yaml), f"line {BAD_YAML_LINE}"]),
    ("yaml-in-set", lambda i: ["params", "tiny_hybrid", "--set", "model.attn_layer_idx=[1"], 2,
     lambda i: ["--set"]),
    ("generate-data-folder", lambda i: ["generate", str(i.byte_data)], 1,
     lambda i: [str(i.byte_data), "hippo export RUN_DIR -o DIR"]),
    ("generate-run-folder", lambda i: ["generate", str(i.byte_model.parent)], 1,
     lambda i: [str(i.byte_model)]),
    ("generate-run-without-export", lambda i: ["generate", str(_unexported_run(i))], 1,
     lambda i: [f"hippo export {_unexported_run(i)} -o {_unexported_run(i) / 'export'}"]),
    ("damaged-export", lambda i: ["generate", str(_damaged_export(i))], 1,
     lambda i: [str(_damaged_export(i)), "model.safetensors does not match its SHA-256"]),
    ("truncated-export", lambda i: ["eval", str(_truncated_export(i)), "--data", str(i.byte_data)], 1,
     lambda i: [str(_truncated_export(i)), "model.safetensors has 100 bytes"]),
    ("run-dir-is-a-file", lambda i: ["train", "tiny_hybrid", "--run-dir", str(i.bad_yaml)], 2,
     lambda i: [f"--run-dir {i.bad_yaml} is a file"]),
    ("eval-data-folder", lambda i: ["eval", str(i.byte_data), "--data", str(i.byte_data)], 1,
     lambda i: [str(i.byte_data), "hippo export"]),
    ("top-p", lambda i: ["generate", str(i.byte_model), "--top-p", "2"], 2, lambda i: ["--top-p", "2"]),
    ("top-k", lambda i: ["generate", str(i.byte_model), "--top-k", "-5"], 2, lambda i: ["--top-k", "-5"]),
    ("temperature", lambda i: ["generate", str(i.byte_model), "--temperature", "0"], 2,
     lambda i: ["--temperature", "--greedy"]),
    ("tokenizer-gone", lambda i: ["generate", str(i.small_model)], 2,
     lambda i: [str(i.small_model / "config.json"), str(i.root / "deleted_training_data")]),
    ("ids-beyond-vocab", lambda i: ["eval", str(i.small_model), "--data", str(i.byte_data)], 1,
     lambda i: [str(i.byte_data), str(i.small_model), "another tokenizer"]),
    ("tokenizer-mismatch", lambda i: ["eval", str(i.bpe_model), "--data", str(i.byte_data)], 1,
     lambda i: [str(i.byte_data), str(i.bpe_model), _hash(i.byte_data), _hash(i.bpe_data)]),
    ("tokenizer-mismatch-reverse", lambda i: ["eval", str(i.byte_model), "--data", str(i.bpe_data)], 1,
     lambda i: [str(i.bpe_data), _hash(i.byte_data), _hash(i.bpe_data), "--tokenizer byte"]),
    ("missing-shard", lambda i: ["eval", str(i.byte_model), "--data", str(i.no_shard)], 1,
     lambda i: [_missing_shard(i)]),
    ("garbage-manifest", lambda i: ["eval", str(i.byte_model), "--data", str(i.garbage_manifest)], 1,
     lambda i: [str(i.garbage_manifest / "manifest.json")]),
    ("nothing-to-upload", lambda i: ["mlflow", "upload", str(i.root)], 1,
     lambda i: [str(i.root / "mlflow_pending.jsonl")]),
]


@pytest.mark.parametrize("argv, code, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_naming_what_to_fix(inputs, capsys, monkeypatch, argv, code, names):
    monkeypatch.delenv("HIPPO_DEBUG", raising=False)
    assert main(argv(inputs)) == code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("hippo: error: "), err
    for name in names(inputs):
        assert name in err[0]


def test_no_space_left_names_the_path(tmp_path, capsys, monkeypatch):
    """A full disk (simulated: no safe way to fill one here) is a line naming where, not a traceback."""
    target = tmp_path / "run" / "mlflow_pending.jsonl"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr("hippo.pretrain.tracking.upload_pending", full_disk)
    assert main(["mlflow", "upload", str(tmp_path / "run")]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"hippo: error: no space left on {target}: free some space or write somewhere else"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only Hippo's user-facing error types become one line: anything else is a bug to report."""
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("hippo.pretrain.tracking.upload_pending", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["mlflow", "upload", str(tmp_path)])


def test_hippo_debug_env_raises_instead(inputs, monkeypatch, capsys):
    argv = ["eval", str(inputs.byte_model), "--data", str(inputs.garbage_manifest)]
    monkeypatch.setenv("HIPPO_DEBUG", "0")
    assert main(argv) == 1 and capsys.readouterr().err.startswith("hippo: error:")
    monkeypatch.setenv("HIPPO_DEBUG", "1")
    with pytest.raises(ManifestError, match="manifest"):
        main(argv)


def test_debug_flag_shows_the_traceback(inputs):
    env = {k: v for k, v in os.environ.items() if k != "HIPPO_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "hippo.pretrain.cli", "--debug", "eval", str(inputs.byte_model),
                           "--data", str(inputs.garbage_manifest)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "hippo: error:" not in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("hippo.data_pipeline.errors.ManifestError: ")


def test_greedy_takes_temperature_zero(inputs, capsys):
    """The fix the --temperature 0 message suggests works as typed."""
    assert main(["generate", str(inputs.byte_model), "--greedy", "--temperature", "0", "--max-new-tokens", "2"]) == 0
    assert "--- sample 1" in capsys.readouterr().out


def test_quickstart_line_puts_each_figure_beside_its_uniform_guess():
    """Loss beside the uniform loss, perplexity beside the uniform perplexity (the vocabulary)."""
    from hippo.pretrain.quickstart import _versus_uniform

    tok = ByteTokenizer()
    line = _versus_uniform(1.74, tok)
    m = re.fullmatch(r"loss ([\d.]+) \(a uniform guess over (\d+) bytes: ([\d.]+)\), "
                     r"perplexity ([\d.]+) \(uniform: (\d+)\)", line)
    assert m, line
    loss, vocab, uniform_loss, ppl, uniform_ppl = (float(g) for g in m.groups())
    assert loss == 1.74 and vocab == uniform_ppl == tok.vocab_size
    assert uniform_loss == pytest.approx(math.log(vocab), abs=1e-3) and ppl == pytest.approx(math.exp(loss), abs=1e-2)


def test_a_run_dir_that_is_a_file_is_the_only_line_on_stderr(inputs):
    """In a fresh process: the one error line, and none of megatron's three "Transformer Engine and
    Apex are not installed" warnings that every command importing it used to print."""
    proc = subprocess.run([sys.executable, "-m", "hippo.pretrain.cli", "train", "tiny_hybrid", "--run-dir",
                           str(inputs.bad_yaml)], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "HIPPO_DEBUG"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"hippo: error: --run-dir {inputs.bad_yaml} is a file, not a folder: name a "
                                        "folder (it is created if missing)"], proc.stderr


def test_eval_data_takes_a_device(inputs, capsys, monkeypatch):
    """`--device` serves both eval modes (the GPU tier evaluates on CUDA): the same loss as the
    default device here, and a CUDA device that is not there refused in one line."""
    argv = ["eval", str(inputs.byte_model), "--data", str(inputs.byte_data), "--batches", "1"]
    assert main(argv) == 0
    default = capsys.readouterr().out
    assert main([*argv, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == default and "loss" in default
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hippo: error: --device cuda") and len(err.splitlines()) == 1, err
