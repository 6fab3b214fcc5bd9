"""lm-evaluation-harness on Hippo models: every score is held to a direct computation with the
model (sum of log-softmax over the continuation's tokens, greedy argmax loops), on task files the
tests write themselves (`dataset_path: json` YAMLs under an --include-path folder); nothing is
downloaded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from hippo.data_pipeline.tokenizer import ByteTokenizer  # noqa: E402
from hippo.pretrain.cli import main  # noqa: E402
from hippo.pretrain.export import save_export  # noqa: E402
from hippo.pretrain.lm_eval_model import HippoEvalLM, evaluate_tasks, task_metrics  # noqa: E402
from hippo.pretrain.models import HippoLM, ModelConfig  # noqa: E402
from hippo.pretrain.models.generation import generate  # noqa: E402

TOK = ByteTokenizer()
EOS = TOK.eos_id
COLORS = ["red", "blue", "green", "black"]
QUESTIONS = ["sky", "leaf", "coal", "rose", "sea", "moss", "ink", "ruby"]
ANSWERS = {"sky": 1, "leaf": 2, "coal": 3, "rose": 0, "sea": 1, "moss": 2, "ink": 3, "ruby": 0}
GEN = {"cat": "meow", "dog": "woof", "cow": "moo", "owl": "hoot"}
DOCS = ["state space models", "hippo hungry hungry hippo, a shift and a diagonal kernel",
        "tokens tokens tokens and more tokens for the rolling windows of the perplexity task"]


def tiny_model(**cfg) -> HippoLM:
    base = dict(vocab_size=257, d_model=16, n_layer=2, n_head=2, attn_layer_idx=[1], d_state=8)
    return HippoLM(ModelConfig(**{**base, **cfg}), seed=3).eval()


def mc_prompt(q: str) -> str:
    return f"The color of {q} is"


def gen_prompt(animal: str) -> str:
    return f"The {animal} says"


def write_tasks(folder: Path) -> Path:
    """Three tasks, one per request type: multiple choice, rolling perplexity, generation."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "mc": [{"question": mc_prompt(q), "choices": COLORS, "label": ANSWERS[q]} for q in QUESTIONS],
        "ppl": [{"text": d} for d in DOCS],
        "gen": [{"prompt": gen_prompt(a), "answer": f" {s}"} for a, s in GEN.items()],
    }
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\ndoc_to_target: label\n"
              "metric_list:\n  - metric: acc\n",
        "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
               "metric_list:\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        "gen": "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
               "generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: 8\n"
               "metric_list:\n  - metric: exact_match\n",
    }
    for name, docs in rows.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"hippo_{name}.yaml").write_text(
            f"task: hippo_{name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files: {{test: {data}}}\n  cache_dir: {folder / 'hf_cache'}\n"
            f"test_split: test\n{specs[name]}metadata:\n  version: 1.0\n")
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def direct_logprobs(model: HippoLM, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one plain forward pass over ids[:-1]."""
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0, :, :257].log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].double()


def direct_loglikelihood(model: HippoLM, ctx: str, cont: str, window: int | None = None) -> tuple[float, bool]:
    """Sum of log-softmax over the continuation's tokens (a context's trailing spaces belong to the
    continuation, lm-eval's rule; an empty context is EOS), with the input cut to the last
    `window` tokens when set."""
    stripped = ctx.rstrip()
    ctx, cont = stripped, ctx[len(stripped):] + cont
    ctx_ids = TOK.encode(ctx) or [EOS]
    ids = ctx_ids + TOK.encode(cont)
    n = len(ids) - len(ctx_ids)
    ids = ids[-(window + 1):] if window else ids
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0, :, :257].log_softmax(-1)[-n:]
    target = torch.tensor(ids[-n:])
    return float(logp.gather(-1, target[:, None]).double().sum()), bool((logp.argmax(-1) == target).all())


def direct_rolling(model: HippoLM, text: str, window: int) -> float:
    """Every token once, conditioned on the tokens since its window began (windows of `window`
    predictions after EOS; the last one keeps a full window of context)."""
    seq = [EOS] + TOK.encode(text)
    n = len(seq) - 1
    total = 0.0
    for t in range(1, n + 1):
        block = (t - 1) // window
        start = n - window if block and (block + 1) * window > n else block * window
        total += float(direct_logprobs(model, seq[start:t + 1])[-1])
    return total


def direct_greedy(model: HippoLM, prompt: str, max_new: int, stop: str, window: int | None = None) -> str:
    """Argmax of a full forward pass, one token at a time (no recurrent state), cut at `stop`."""
    ids = TOK.encode(prompt)
    ids = ids[-(window - max_new):] if window else ids
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids + new]))[0, -1, :257].argmax())
            if token == EOS:
                break
            new.append(token)
    return TOK.decode(new).split(stop)[0]


LL_ARGS = [("The color of sky is", " blue"), ("a", " much longer continuation of text"), ("", "no context"),
           ("hippo ", "shift"), ("state space", " models")]


def test_loglikelihoods_equal_a_direct_computation_with_the_model():
    model = tiny_model()
    lm = HippoEvalLM(model=model, tokenizer=TOK)
    got = lm.loglikelihood(requests("loglikelihood", LL_ARGS))
    for (ctx, cont), (ll, greedy) in zip(LL_ARGS, got, strict=True):
        want_ll, want_greedy = direct_loglikelihood(model, ctx, cont)
        assert ll == pytest.approx(want_ll, abs=1e-5) and greedy == want_greedy
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in DOCS]))
    for doc, ll in zip(DOCS, rolling, strict=True):
        assert ll == pytest.approx(float(direct_logprobs(model, [EOS] + TOK.encode(doc)).sum()), abs=1e-5)


def test_scores_do_not_depend_on_batch_size_or_padding():
    """Batches of 3 mix lengths (right padding, prompts grouped by length for generation);
    every number equals the one-at-a-time run."""
    model = tiny_model()
    one, three = (HippoEvalLM(model=model, tokenizer=TOK, batch_size=b) for b in (1, 3))
    ll = requests("loglikelihood", LL_ARGS)
    for (a, ga), (b, gb) in zip(one.loglikelihood(ll), three.loglikelihood(ll), strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    rolling = requests("loglikelihood_rolling", [(d,) for d in DOCS])
    assert three.loglikelihood_rolling(rolling) == pytest.approx(one.loglikelihood_rolling(rolling), abs=1e-5)
    kwargs = {"until": ["\n"], "do_sample": False, "max_gen_toks": 6}
    gen = requests("generate_until", [(p, kwargs) for p in ["ab", "cd", "The dog says", "xyz", "The cat says"]])
    assert three.generate_until(gen) == one.generate_until(gen)


def test_contexts_longer_than_the_window_keep_the_continuation():
    """Learned positions allow 16 tokens: a longer context is cut from the left (lm-eval's rule),
    documents are scored in rolling windows, prompts leave room for the generated tokens."""
    model = tiny_model(position_embedding="learned", max_position_embeddings=16, attn_layer_idx=[0, 1])
    lm = HippoEvalLM(model=model, tokenizer=TOK, batch_size=2)
    assert lm.max_length == 16
    long_ctx = "a context of many more than sixteen bytes, "
    args = [(long_ctx, "the end"), ("short", " one")]
    for (ctx, cont), (ll, greedy) in zip(args, lm.loglikelihood(requests("loglikelihood", args)), strict=True):
        want_ll, want_greedy = direct_loglikelihood(model, ctx, cont, window=16)
        assert ll == pytest.approx(want_ll, abs=1e-5) and greedy == want_greedy
    with pytest.raises(ValueError):  # the untruncated input does not fit the model at all
        direct_loglikelihood(model, long_ctx, "the end")
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in DOCS]))
    assert rolling == pytest.approx([direct_rolling(model, d, 16) for d in DOCS], abs=1e-5)
    kwargs = {"until": ["\n"], "do_sample": False, "max_gen_toks": 5}
    prompts = [long_ctx, "The cow says"]
    got = lm.generate_until(requests("generate_until", [(p, kwargs) for p in prompts]))
    assert got == [direct_greedy(model, p, 5, "\n", window=16) for p in prompts]


def test_the_three_task_kinds_match_direct_computations(tasks_dir):
    """Through lm-eval's evaluator: accuracy from the argmax of direct choice log-likelihoods,
    byte perplexity from direct document log-likelihoods, exact match from a direct greedy loop."""
    model = tiny_model()
    results = evaluate_tasks(model, TOK, "hippo_mc,hippo_ppl,hippo_gen", include_path=tasks_dir, batch_size=3,
                             bootstrap_iters=0)
    metrics = task_metrics(results)
    hits = []
    for q in QUESTIONS:
        scores = [direct_loglikelihood(model, mc_prompt(q), " " + c)[0] for c in COLORS]
        hits.append(max(range(4), key=scores.__getitem__) == ANSWERS[q])
    assert metrics["hippo_mc/acc"] == pytest.approx(sum(hits) / len(hits))
    ll = sum(float(direct_logprobs(model, [EOS] + TOK.encode(d)).sum()) for d in DOCS)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert metrics["hippo_ppl/byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    assert metrics["hippo_ppl/bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    matches = [direct_greedy(model, gen_prompt(a), 8, "\n") == f" {s}" for a, s in GEN.items()]
    assert metrics["hippo_gen/exact_match"] == pytest.approx(sum(matches) / len(matches))


def train_to_answer(steps: int = 200) -> HippoLM:
    """A tiny H3 model taught (AdamW, byte tokens) the right color of each thing and each animal's sound."""
    torch.manual_seed(0)
    model = tiny_model(d_model=32, attn_layer_idx=[], d_state=8).train()
    texts = [f"{mc_prompt(q)} {COLORS[ANSWERS[q]]}\n" for q in QUESTIONS]
    texts += [gen_prompt(a) + f" {s}\n" for a, s in GEN.items()]
    width = max(len(t) for t in texts) + 1
    batch = torch.full((len(texts), width), EOS)
    for i, t in enumerate(texts):
        batch[i, 1:len(t) + 1] = torch.tensor(TOK.encode(t))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> HippoLM:
    """One thread: this tiny model trains in seconds alone, but minutes on a busy machine when
    two threads contend with other processes' cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_to_answer()
    finally:
        torch.set_num_threads(threads)


def test_a_model_trained_on_the_answers_scores_them_all(trained, tasks_dir, tmp_path, capsys):
    """`hippo eval EXPORT --tasks`: results JSON and table; accuracy and exact match 1.0 (chance
    on the choices is 4^-8)."""
    save_export(tmp_path / "export", dict(trained.named_parameters()), trained.cfg, tokenizer="byte", step=200)
    assert main(["eval", str(tmp_path / "export"), "--tasks", "hippo_mc,hippo_gen", "--include-path", str(tasks_dir),
                 "--device", "cpu", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "hippo_mc" in out and "results written to" in out
    results = json.loads((tmp_path / "export" / "eval_results.json").read_text())
    assert results["results"]["hippo_mc"]["acc,none"] == 1.0
    assert results["results"]["hippo_gen"]["exact_match,none"] == 1.0
    assert results["config"]["model_source"] == str(tmp_path / "export")


def test_generation_stops_at_the_stop_string(trained, monkeypatch):
    """The recurrent loop ends once the text holds a stop string, not after max_gen_toks: the
    trained model goes on with "ow" and a newline unless stopped."""
    import hippo.pretrain.lm_eval_model as module

    lengths = []
    def spy(model, prompt, *args, **kwargs):
        out = generate(model, prompt, *args, **kwargs)
        lengths.append(out.shape[1] - prompt.shape[1])
        return out
    monkeypatch.setattr(module, "generate", spy)
    lm = HippoEvalLM(model=trained, tokenizer=TOK)
    kwargs = {"until": [" me"], "do_sample": False, "max_gen_toks": 20}
    assert lm.generate_until(requests("generate_until", [(gen_prompt("cat"), kwargs)])) == [""]
    assert lengths == [3]


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_hippo_model(tasks_dir, tmp_path):
    """`python -m hippo.pretrain.lm_eval_model` is lm-eval's own command line with `--model hippo`;
    its score equals the in-process one, and lm-eval's own models stay registered."""
    model = tiny_model()
    save_export(tmp_path / "export", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    cmd = [sys.executable, "-m", "hippo.pretrain.lm_eval_model", "--model", "hippo", "--model_args",
               f"path={tmp_path / 'export'}", "--tasks", "hippo_mc", "--include_path", str(tasks_dir), "--device",
               "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hippo_mc" in proc.stdout
    (written,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(written.read_text())["results"]["hippo_mc"]["acc,none"]
    expected = evaluate_tasks(model, TOK, ["hippo_mc"], include_path=tasks_dir, bootstrap_iters=0)
    assert acc == pytest.approx(expected["results"]["hippo_mc"]["acc,none"])
    check = "import hippo.pretrain.lm_eval_model\nfrom lm_eval.api.registry import get_model\n" \
            "print(get_model('hippo').__name__, get_model('dummy').__name__)"
    names = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert names.stdout.split() == ["HippoEvalLM", "DummyLM"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "hippo_mc", "--split", "train"], "--split: not an option of `hippo eval --tasks`"),
    (["--data", "x", "--num-fewshot", "2"], "--num-fewshot: not an option of `hippo eval --data`"),
    (["--tasks", "hippo_mc", "--num-fewshot", "-1"], "--num-fewshot (num_fewshot) must be >= 0"),
    (["--tasks", "hippo_mc", "--batch-size", "0"], "--batch-size (batch_size) must be >= 1"),
    (["--tasks", "hippo_mc", "--include-path", "/nonexistent/tasks"], "--include-path /nonexistent/tasks: no such"),
])
def test_bad_eval_options_get_one_line_naming_the_option(tasks_dir, tmp_path, capsys, argv, message):
    model = tiny_model()
    save_export(tmp_path / "e", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    extra = ["--include-path", str(tasks_dir)] if "--tasks" in argv and "--include-path" not in argv else []
    assert main(["eval", str(tmp_path / "e"), *argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hippo: error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.slow  # lm-eval indexes its own 14,000 tasks to look the name up
def test_an_unknown_task_is_named(tasks_dir, tmp_path, capsys):
    model = tiny_model()
    save_export(tmp_path / "e", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    assert main(["eval", str(tmp_path / "e"), "--tasks", "hippo_mc,no_such_task", "--include-path",
                 str(tasks_dir)]) == 2
    err = capsys.readouterr().err
    assert "--tasks: no task no_such_task among lm-eval's tasks nor under --include-path" in err


@pytest.mark.slow
def test_a_task_whose_data_cannot_be_fetched_says_how_to_run_offline(tmp_path):
    """A hub dataset with the hub out of reach (offline mode): one line, not datasets' traceback."""
    model = tiny_model()
    save_export(tmp_path / "e", dict(model.named_parameters()), model.cfg, tokenizer="byte", step=0)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hub.yaml").write_text(
        "task: hub_task\ndataset_path: hippo-tests/no-such-dataset\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: a\ndoc_to_target: b\n")
    proc = subprocess.run([sys.executable, "-m", "hippo.pretrain.cli", "eval", str(tmp_path / "e"), "--tasks",
                           "hub_task", "--include-path", str(tmp_path / "tasks"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                               "HF_HOME": str(tmp_path / "hf")})
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("hippo: error: ") and "no-such-dataset" in last and "--include-path" in last


def test_eval_needs_data_or_tasks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path)])
    assert "one of the arguments --data --tasks is required" in capsys.readouterr().err


@pytest.mark.slow
def test_tasks_are_evaluated_during_training_and_logged(tasks_dir, train_data, tmp_path):
    """`train.eval_tasks`: every eval_interval and at the end on rank 0, logged to metrics.jsonl
    and MLflow; the final score equals `hippo eval --tasks` of the run's export."""
    from mlflow.tracking import MlflowClient

    from tests.helpers import hippo_train

    run = tmp_path / "run"
    hippo_train(run, train_data, "train.eval_tasks=[hippo_mc]", f"train.eval_tasks_include_path={tasks_dir}")
    during = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in during if "eval/hippo_mc/acc" in r] == [8, 16]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    [mlrun] = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "eval/hippo_mc/acc")}
    assert sorted(history) == [8, 16, 24]
    out = tmp_path / "final.json"
    assert main(["eval", str(run / "export"), "--tasks", "hippo_mc", "--include-path", str(tasks_dir),
                 "--output", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["results"]["hippo_mc"]["acc,none"] == pytest.approx(history[24], abs=1e-12)
