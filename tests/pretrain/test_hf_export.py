"""`hippo export --format hf`: a folder `transformers` loads without Hippo, computing Hippo's model.

The slow tests load each folder in a fresh interpreter that cannot import Hippo (`hf_child.py`) and
hold its logits, bf16 logits, greedy generations and tokenizer to Hippo's. The fast ones use the
exported modeling file in-process as an independent reference (it is written from the math, not
from Hippo's code), and check the way back: `hippo import hf`, `--init-from`, refusals.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hippo.pretrain.cli import main
from hippo.pretrain.config import ConfigError, load_config
from hippo.pretrain.export import save_export
from hippo.pretrain.h3_checkpoint import import_h3
from hippo.pretrain.hf_export import export_hf, import_hf
from hippo.pretrain.models import HippoLM, ModelConfig
from hippo.pretrain.models.generation import SamplingConfig, generate
from tests.helpers import ROOT
from tests.pretrain.test_h3_checkpoint import authors_state_dict

CHILD = Path(__file__).with_name("hf_child.py")
CHILD_PYTHON = "HIPPO_HF_TEST_PYTHON"
"""Environment variable: the interpreter of the child (default this one), e.g. a venv with another
transformers version; it needs torch and transformers only."""
VOCAB = 257  # the byte tokenizer; the embedding has 264 rows
TOL = 1e-5  # fp32: largest logit difference relative to the largest logit
BF16_TOL = 5e-2  # bf16 weights and activations (SSM parameters and arithmetic fp32) against Hippo in fp32
PROMPTS = ["def ", "import numpy as np\n", "The H3 layer", "x"]  # 4, 19, 12 and 1 tokens: left padding
NEW_TOKENS = 64
LENGTHS = (300, 80, 40)

MODELS = {  # name: ModelConfig fields of a tiny model (d_model 16, 2 layers, 2 heads)
    "h3": dict(attn_layer_idx=[]),
    "hybrid": dict(attn_layer_idx=[1]),
    "transformer": dict(attn_layer_idx=[0, 1], position_embedding="learned", max_position_embeddings=320),
    "s4d_rotary": dict(mixer="s4d", attn_layer_idx=[1], position_embedding="rotary", rotary_dim=4),
    "hybrid_isolated": dict(attn_layer_idx=[1], document_isolation=True, eos_id=256),  # EOS in both rows at L 300
}
ALL = [*MODELS, "authors_rotary"]  # + an import of the authors' layout: H3 + attention, rotary on 8 of 16 dims


def _ids(L: int, batch: int = 2, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, L), generator=torch.Generator().manual_seed(seed))


def _err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _hippo_model(name: str, root: Path) -> Path:
    """A Hippo export of model `name` under root/name/export."""
    folder = root / name / "export"
    if name == "authors_rotary":
        path = root / name / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save(authors_state_dict(32, 3, (1,), rotary_dim=8), path)
        import_h3(path, folder, n_head=2, tokenizer="byte")
        return folder
    # init_std 0.3: logits of O(1) and varied greedy continuations
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, init_std=0.3, **MODELS[name])
    model = HippoLM(cfg, seed=11)
    save_export(folder, dict(model.named_parameters()), cfg, tokenizer="byte", step=3)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[HippoLM, Path]]:
    """name -> (Hippo's model, its HF folder); the first through the CLI."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, name in enumerate(ALL):
        export = _hippo_model(name, root)
        hf = root / name / "hf"
        if i == 0:
            assert main(["export", str(export), "-o", str(hf), "--format", "hf"]) == 0
        else:
            export_hf(export, hf)
        out[name] = (HippoLM.from_pretrained(export), hf)
    return out


def _hippo_greedy(model: HippoLM, prompt: str) -> list[int]:
    """What `hippo generate --greedy` generates: one prompt at a time, stopping at EOS."""
    ids = torch.tensor([list(prompt.encode())])
    out = generate(model, ids, NEW_TOKENS, SamplingConfig(greedy=True), vocab_size=VOCAB, eos_id=256)
    return out[0, ids.shape[1]:].tolist()


BPE_TEXTS = ["state space hippo", " shift kernel<|endoftext|>token", "unseen wörds"]


def _bpe_folder(root: Path) -> Path:
    """The HF folder of a model trained with a byte-level BPE tokenizer (copied, not converted)."""
    from hippo.data_pipeline.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["state space hippo shift kernel token model " * 3] * 40, root / "bpe.json",
                              vocab_size=300, min_frequency=1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2)
    save_export(root / "bpe_export", dict(HippoLM(cfg).named_parameters()), cfg, tokenizer=str(root / "bpe.json"),
                step=0)
    return export_hf(root / "bpe_export", root / "bpe_hf")


@pytest.fixture(scope="module")
def child(folders, tmp_path_factory) -> dict:
    """Every job of the slow tests in one interpreter without Hippo: (kind, name, ...) -> result."""
    root = tmp_path_factory.mktemp("child")
    jobs, keys = [], []
    for name, (_, hf) in folders.items():
        for L in LENGTHS:
            jobs.append({"kind": "logits", "dir": str(hf), "ids": _ids(L).tolist()})
            keys.append(("logits", name, L))
        jobs.append({"kind": "logits", "dir": str(hf), "ids": _ids(80).tolist(), "dtype": "bfloat16"})
        keys.append(("bf16", name))
        jobs.append({"kind": "generate", "dir": str(hf), "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS})
        keys.append(("generate", name))
    texts = ["héllo wörld\n\t", "the text <|endoftext|> is bytes", ""]
    jobs.append({"kind": "tokenize", "dir": str(folders["h3"][1]), "texts": texts,
                 "decode": [list(t.encode()) + [256] for t in texts]})
    keys.append(("tokenize",))
    bpe = _bpe_folder(root)
    jobs.append({"kind": "tokenize", "dir": str(bpe), "texts": BPE_TEXTS})
    keys.append(("tokenize_bpe",))
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = os.environ.get(CHILD_PYTHON, sys.executable)
    proc = subprocess.run([python, str(CHILD), str(root / "jobs.json"), str(root / "out.pt")], env=env,
                          cwd=root, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(root / "out.pt")
    assert out["leaked"] == [], f"the child imported {out['leaked']}"
    return {**dict(zip(keys, out["results"])), ("bpe_tokenizer",): root / "bpe.json"}


# ------------------------------------------------------------------------- without Hippo (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_transformers_alone_computes_hippos_logits(folders, child, name):
    """fp32, at L = 300 and 80 (longer than the 64 shift taps) and 40: within 1e-5 of the largest logit."""
    model, _ = folders[name]
    for L in LENGTHS:
        got = child[("logits", name, L)]
        assert got["class"] == "HippoForCausalLM" and got["logits"].shape == (2, L, VOCAB)
        with torch.no_grad():
            expected = model(_ids(L))[..., :VOCAB]
        assert expected.abs().max() > 1.0
        assert _err(got["logits"], expected) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_bf16_keeps_the_ssm_in_fp32_and_stays_within_the_bound(folders, child, name):
    model, _ = folders[name]
    got = child[("bf16", name)]
    assert got["ssm_dtypes"] in ([], ["torch.float32"])
    with torch.no_grad():
        expected = model(_ids(80))[..., :VOCAB]
    assert _err(got["logits"], expected) < BF16_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_greedy_generate_of_a_left_padded_batch_equals_hippo_generate(folders, child, name):
    """`generate(do_sample=False, max_new_tokens=64)` on prompts of 1 to 19 tokens in one batch
    (left padding kept out of every state) gives the tokens `hippo generate --greedy` gives."""
    model, _ = folders[name]
    got = child[("generate", name)]
    assert got["padded"]
    assert got["tokens"] == [_hippo_greedy(model, p) for p in PROMPTS]


@pytest.mark.slow
def test_autotokenizer_gives_the_byte_tokenizers_ids(child):
    got = child[("tokenize",)]
    texts = ["héllo wörld\n\t", "the text <|endoftext|> is bytes", ""]
    assert got["ids"] == [list(t.encode()) for t in texts] and got["eos_token_id"] == 256
    assert got["decoded"] == texts


@pytest.mark.slow
def test_autotokenizer_gives_a_bpe_tokenizers_ids(child):
    from hippo.data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(str(child[("bpe_tokenizer",)]))  # the file the model was trained with
    got = child[("tokenize_bpe",)]
    assert got["ids"] == [tok.encode(t) for t in BPE_TEXTS] and got["eos_token_id"] == tok.eos_id


# --------------------------------------------------------------- in-process reference (fast)
def _import_transformers():
    """transformers, with its dependency `kernels` imported from site-packages first: while the
    repository root is on sys.path (as under pytest), Hippo's own kernels/ folder shadows it."""
    pytest.importorskip("transformers")
    if (found := importlib.util.find_spec("kernels")) and Path(found.origin or "").resolve().is_relative_to(ROOT):
        saved = sys.path[:]
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        try:
            importlib.import_module("kernels")
        except ImportError:
            pass  # not installed: transformers then finds no usable `kernels` and does not use it
        finally:
            sys.path[:] = saved
    import transformers

    return transformers


def _reference(hf: Path, dtype: torch.dtype = torch.float32):
    transformers = _import_transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True, dtype=dtype).eval()


@pytest.mark.parametrize("name", ["hybrid", "s4d_rotary"])
def test_hippo_matches_the_modeling_file_and_its_recurrence(tmp_path, name):
    """Hippo's logits equal the HF model's (FFT convolution); its cached decoding (the
    recurrences, one token at a time after a prefill) equals its own full forward."""
    export = _hippo_model(name, tmp_path)
    model = HippoLM.from_pretrained(export)
    ref = _reference(export_hf(export, tmp_path / "hf"))
    ids = _ids(70)
    with torch.no_grad():
        full = ref(ids).logits
        assert _err(model(ids)[..., :VOCAB], full) < TOL
        out = ref(ids[:, :50], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(50, 70):
            out = ref(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    assert _err(torch.stack(steps[:-1], dim=1), full[:, 49:69]) < TOL


@pytest.mark.parametrize("name", ["hybrid", "s4d_rotary"])
def test_cached_generation_equals_recomputing_every_step(tmp_path, name):
    """Greedy and beam search (the cache reordered between beams) over a left-padded batch give the
    same tokens with the recurrent cache as with a full forward pass per token."""
    ref = _reference(export_hf(_hippo_model(name, tmp_path), tmp_path / "hf"))
    ids = torch.tensor([[256, 256, 256, 100, 101, 102], [5, 6, 7, 8, 9, 10]])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    for kwargs in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        with torch.no_grad():
            cached = ref.generate(ids, attention_mask=mask, max_new_tokens=12, use_cache=True, **kwargs)
            full = ref.generate(ids, attention_mask=mask, max_new_tokens=12, use_cache=False, **kwargs)
        assert torch.equal(cached, full), kwargs


# ---------------------------------------------------------------------- the way back (fast)
def test_export_import_export_round_trips_bit_for_bit(tmp_path, capsys):
    export = _hippo_model("hybrid", tmp_path)
    hf1, back, hf2 = tmp_path / "hf1", tmp_path / "back", tmp_path / "hf2"
    assert main(["export", str(export), "-o", str(hf1), "--format", "hf"]) == 0
    assert main(["import", "hf", str(hf1), "-o", str(back)]) == 0
    assert main(["export", str(back), "-o", str(hf2), "--format", "hf"]) == 0
    files = sorted(p.name for p in hf1.iterdir())
    assert files == sorted(p.name for p in hf2.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "configuration_hippo.py", "modeling_hippo.py"} <= set(files)
    assert all((hf1 / f).read_bytes() == (hf2 / f).read_bytes() for f in files)
    assert (export / "model.safetensors").read_bytes() == (back / "model.safetensors").read_bytes()
    a, b = json.loads((export / "config.json").read_text()), json.loads((back / "config.json").read_text())
    assert a == b


def test_hippo_reads_an_hf_folder_as_an_export(tmp_path, capsys):
    """`HippoLM.from_pretrained`, `hippo generate` and the `--init-from` check take the folder."""
    from hippo.pretrain.builders import check_init_from

    export = _hippo_model("hybrid", tmp_path)
    hf = export_hf(export, tmp_path / "hf")
    ids = _ids(20)
    with torch.no_grad():
        assert torch.equal(HippoLM.from_pretrained(hf)(ids), HippoLM.from_pretrained(export)(ids))
    assert main(["generate", str(hf), "--prompt", "def", "--max-new-tokens", "4", "--greedy"]) == 0
    assert "--- sample 1" in capsys.readouterr().out
    cfg = load_config("tiny_hybrid", ["model.d_model=16", "model.n_layer=2", "model.n_head=2",
                                      "model.attn_layer_idx=[1]", "model.init_std=0.3", "model.vocab_size=257"])
    tok_id = "byte:" + json.loads((hf / "config.json").read_text())["hippo"]["tokenizer_info"]["hash"]
    check_init_from(cfg, hf, tok_id)
    with pytest.raises(ConfigError, match="model.d_model: 16 .export. vs 32"):
        check_init_from(load_config("tiny_hybrid", ["model.d_model=32", "model.vocab_size=257"]), hf, tok_id)


@pytest.mark.parametrize("edit, reason", [
    ({"model_type": "llama"}, "model_type 'llama' is not a Hippo model"),
    ({"mixer": "mamba"}, "Hippo cannot build this model: .*mixer"),
    ({"d_state": 63}, "Hippo cannot build this model: model.d_state must be even"),
    ({"tie_word_embeddings": False}, "ties the LM head"),
    ({"d_model": 32}, "the weights do not fit its config"),
])
def test_a_folder_hippo_cannot_build_is_refused_with_the_reason(tmp_path, capsys, edit, reason):
    import re

    hf = export_hf(_hippo_model("hybrid", tmp_path), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **edit}))
    assert main(["import", "hf", str(hf), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hippo: error: ") and err.count("\n") == 1 and re.search(reason, err), err
    assert not (tmp_path / "out").exists()


def test_a_folder_saved_again_by_transformers_goes_back_into_hippo(tmp_path):
    """A user's `model.save_pretrained(DIR)` (after fine-tuning, say) is still a Hippo model."""
    export = _hippo_model("s4d_rotary", tmp_path)
    ref = _reference(export_hf(export, tmp_path / "hf"))
    ref.save_pretrained(tmp_path / "saved")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tmp_path / "hf" / f, tmp_path / "saved" / f)
    import_hf(tmp_path / "saved", tmp_path / "back")
    ids = _ids(30)
    with torch.no_grad():
        assert torch.equal(HippoLM.from_pretrained(tmp_path / "back")(ids), HippoLM.from_pretrained(export)(ids))


def _isolated(name: str, root: Path) -> Path:
    """A Hippo export of model `name` with `model.document_isolation` (EOS 256)."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, init_std=0.3, document_isolation=True,
                      eos_id=256, **MODELS[name])
    return save_export(root / name / "export", dict(HippoLM(cfg, seed=11).named_parameters()), cfg, tokenizer="byte",
                       step=1)


def _packed(L: int, every: int = 23, batch: int = 2) -> torch.Tensor:
    """Random byte windows with an EOS every `every` tokens, at other offsets in each row, two in a
    row once, and one at position 0 of the first row."""
    ids = _ids(L, batch) % 256
    for b in range(batch):
        ids[b, (5 + 7 * b) :: every] = 256
    ids[0, 0] = ids[0, 40] = ids[0, 41] = 256
    return ids


@pytest.mark.parametrize("name", ["hybrid", "s4d_rotary", "transformer"])
def test_document_isolation_hf_model_computes_hippos_logits_and_decodes_across_documents(tmp_path, name):
    """An isolated model exports (`hippo export --format hf`): the HF model's logits on packed
    windows equal Hippo's (each document alone), they differ from the same weights without
    isolation, its cached decoding through EOS tokens (the states cleared after each) equals its
    full forward, and Hippo reads the folder back with isolation on."""
    export = _isolated(name, tmp_path)
    hf = tmp_path / "hf"
    assert main(["export", str(export), "-o", str(hf), "--format", "hf"]) == 0
    model = HippoLM.from_pretrained(export)
    ref = _reference(hf)
    ids = _packed(90)
    with torch.no_grad():
        full = ref(ids).logits
        assert _err(model(ids)[..., :VOCAB], full) < TOL
        config = json.loads((hf / "config.json").read_text())
        config["document_isolation"] = False
        (hf / "config.json").write_text(json.dumps(config))
        assert _err(_reference(hf)(ids).logits, full) > 1e-3  # isolation is what made them equal
        out = ref(ids[:, :30], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(30, 90):
            out = ref(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    assert _err(torch.stack(steps[:-1], dim=1), full[:, 29:89]) < TOL
    config["document_isolation"] = True
    (hf / "config.json").write_text(json.dumps(config))
    back = import_hf(hf, tmp_path / "back")
    assert HippoLM.from_pretrained(back).cfg.document_isolation is True


def test_a_model_with_document_isolation_is_refused_by_the_h3_format_naming_the_option(tmp_path, capsys):
    """The authors' H3 code does not isolate packed documents: exporting such a model to their
    format would change its logits silently, so it is refused in one line."""
    export = _isolated("hybrid", tmp_path)
    assert main(["export", str(export), "-o", str(tmp_path / "h3"), "--format", "h3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hippo: error: model.document_isolation=true") and err.count("\n") == 1, err
    assert not (tmp_path / "h3").exists()


def test_an_hf_folder_older_than_document_isolation_still_imports(tmp_path):
    hf = export_hf(_hippo_model("hybrid", tmp_path), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["document_isolation"] is False
    del config["document_isolation"], config["eos_id"]
    (hf / "config.json").write_text(json.dumps(config))
    back = import_hf(hf, tmp_path / "back")
    assert HippoLM.from_pretrained(back).cfg.document_isolation is False


# ------------------------------------------------------------------------ lm-eval (slow)
@pytest.mark.slow
def test_lm_eval_hf_scores_equal_hippo_eval(tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` (its own process, no
    Hippo) on the offline task files of test_lm_eval scores a model taught the answers as
    `hippo eval --tasks` does on its Hippo export: multiple choice, rolling perplexity, generation."""
    pytest.importorskip("lm_eval")
    from hippo.data_pipeline.tokenizer import ByteTokenizer
    from hippo.pretrain.lm_eval_model import evaluate_tasks, task_metrics
    from tests.pretrain.test_lm_eval import train_to_answer, write_tasks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_to_answer()
    finally:
        torch.set_num_threads(threads)
    tasks = write_tasks(tmp_path / "tasks")
    save_export(tmp_path / "export", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    hf = export_hf(tmp_path / "export", tmp_path / "hf")
    names = "hippo_mc,hippo_ppl,hippo_gen"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf},trust_remote_code=True",
           "--tasks", names, "--include_path", str(tasks), "--device", "cpu", "--batch_size", "3",
           "--output_path", str(tmp_path / "out")]
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(written.read_text())["results"]
    expected = task_metrics(evaluate_tasks(model, ByteTokenizer(), names, include_path=tasks, batch_size=3,
                                           bootstrap_iters=0))
    assert expected["hippo_mc/acc"] > 0.5 and expected["hippo_gen/exact_match"] > 0.5  # taught: scores to lose
    assert got["hippo_mc"]["acc,none"] == expected["hippo_mc/acc"]
    assert got["hippo_gen"]["exact_match,none"] == expected["hippo_gen/exact_match"]
    assert got["hippo_ppl"]["byte_perplexity,none"] == pytest.approx(expected["hippo_ppl/byte_perplexity"], rel=1e-5)


# ------------------------------------------------------------------- training side (slow)
@pytest.mark.slow
def test_train_init_from_an_hf_folder_starts_from_its_weights(train_data, tmp_path):
    """`hippo train --init-from HF_DIR`: at a negligible learning rate the end-of-run export still
    holds the folder's weights (not the seeded init)."""
    from safetensors.torch import load_file

    from tests.helpers import BASE, hippo_train

    cfg = load_config("tiny_hybrid", [o for o in BASE if o.startswith("model.")])
    start = HippoLM(cfg.model, seed=77)
    save_export(tmp_path / "start", dict(start.named_parameters()), cfg.model, tokenizer=str(train_data), step=0)
    hf = export_hf(tmp_path / "start", tmp_path / "hf")
    hippo_train(tmp_path / "run", train_data, "train.steps=2", "optim.lr=1e-12", "tracking.enabled=false",
                "--init-from", str(hf))
    got = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert all(torch.allclose(got[k], p, atol=1e-6) for k, p in start.named_parameters())


@pytest.mark.slow
def test_hf_export_of_a_tp2_pp2_checkpoint_equals_that_of_its_gathered_export(train_data, tmp_path):
    """From the TP 2 x PP 2 checkpoint (universal conversion, one process) and from the trainer's own
    export of the same run (written stage by stage, never gathered): the same folder, bit for bit."""
    from tests.helpers import hippo_train, torchrun

    run = tmp_path / "run"
    hippo_train(run, train_data, "train.steps=2", "tracking.enabled=false", "parallel.tensor=2",
                "parallel.pipeline=2", nproc=4)
    torchrun(0, ["-m", "hippo.pretrain.cli", "export", str(run), "-o", str(tmp_path / "a"), "--format", "hf"])
    export_hf(run / "export", tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.safetensors" in files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
