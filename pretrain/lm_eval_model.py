"""Zero/few-shot benchmarks (LAMBADA, HellaSwag, PIQA, ARC, WinoGrande, ...) through
lm-evaluation-harness, on Hippo's own model and tokenizer.

`HippoEvalLM` is lm-eval's model interface over a `HippoLM`: log-likelihoods from one causal
pass (right padding, which a causal model never sees), rolling windows for perplexity, and
generation in Hippo's recurrent mode. Long inputs are cut as lm-eval's Hugging Face model cuts
them: from the left, keeping the continuation, at `max_length`.

lm-eval 0.4.13 finds models only in its own registry (no entry points, no plugin import), so
importing this module registers the name `hippo`, and `python -m hippo.pretrain.lm_eval_model
ARGS` is lm-eval's own command line with it: `--model hippo --model_args path=EXPORT`.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hippo.data_pipeline.tokenizer import Tokenizer
from hippo.pretrain.config import ConfigError
from hippo.pretrain.devices import resolve_device
from hippo.pretrain.export import export_tokenizer, load_export
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.generation import SamplingConfig, generate

log = logging.getLogger(__name__)

MODEL_NAME = "hippo"
DEFAULT_MAX_LENGTH = 2048
"""Window of models without position embeddings (H3, hybrids): lm-eval's Hugging Face default,
and the context the paper's models were trained on."""
DEFAULT_MAX_GEN_TOKS = 256
SAMPLING_KWARGS = {"do_sample", "temperature", "top_k", "top_p"}
Request = tuple[tuple[str, str] | None, list[int], list[int]]
"""(cache key, context tokens, continuation tokens), as TemplateLM hands them over."""


class TaskDataError(Exception):
    """A task's dataset could not be fetched (offline, or the hub unreachable); the message says
    how to run the task from local files."""


class HippoEvalLM(TemplateLM):
    """lm-eval's model over a Hippo model and tokenizer (an export folder, or both in memory)."""

    def __init__(self, path: str | None = None, *, model: HippoLM | None = None, tokenizer: Tokenizer | None = None,
                 device: str | None = None, batch_size: int | str = 1, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, source: str | None = None,
                 max_batch_size: int | None = None, trust_remote_code: bool | None = None) -> None:
        """`path`: an export folder (lm-eval's `--model_args path=...`); or `model` and `tokenizer`,
        with `source` naming them in the results. `max_batch_size` and `trust_remote_code` are what
        lm-eval passes every model; unused here."""
        super().__init__()
        if (path is None) == (model is None) or (model is None) != (tokenizer is None):
            raise ConfigError("hippo model: give either path=EXPORT (--model_args path=...) or both model and "
                              "tokenizer")
        self._device = resolve_device(device, model)
        if path is not None:
            model, meta = load_export(Path(path), device=self._device)
            tokenizer = export_tokenizer(Path(path), meta)
            source, self._step = source or str(path), meta.get("step")
        else:
            model = model.to(self._device)
            self._step = None
        self._source = source
        self.model, self.tokenizer = model, tokenizer
        self._batch_size = check_batch_size(batch_size)
        self._max_length = check_max_length(max_length, model)
        self._max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: EOS, as GPT-2-style tokenizers have no BOS."""
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        """The model's window: set by the user, else the learned positions' limit, else 2048."""
        cfg = self.model.cfg
        if self._max_length:
            return self._max_length
        return cfg.max_position_embeddings if cfg.position_embedding == "learned" else DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Hippo tokenizers add no special tokens, so the flag changes nothing."""
        return self.tokenizer.encode(string)

    def get_model_info(self) -> dict:
        """Recorded in the results' `config`, to tell runs apart."""
        return {"model_source": self._source, "model_step": self._step, "max_length": self.max_length,
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "tokenizer": self.tokenizer.name}

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each continuation; longest first, in batches."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        out: list[tuple[float, bool]] = []
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            scores = self._score([(ctx, cont) for _, ctx, cont in chunk])
            for (key, _, _), score in zip(chunk, scores, strict=True):
                if key is not None:  # rolling windows are cached per document, by the caller
                    self.cache_hook.add_partial("loglikelihood", key, score)
            out.extend(scores)
        return order.get_original(out)

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One causal pass over right-padded inputs; log-softmax over the real vocabulary (padded
        embedding rows are no tokens), at the continuation's positions only."""
        inputs = [self._window(ctx, cont) for ctx, cont in pairs]
        ids = torch.full((len(inputs), max(len(i) for i in inputs)), self.eot_token_id, dtype=torch.long)
        for row, inp in enumerate(inputs):
            ids[row, :len(inp)] = torch.tensor(inp)
        hidden = self.model.hidden_states(ids.to(self.device))
        vocab = self.model.cfg.vocab_size
        scores = []
        for row, (inp, (_, cont)) in enumerate(zip(inputs, pairs, strict=True)):
            h = hidden[row, len(inp) - len(cont):len(inp)]
            logp = self.model.embedding.logits(h)[:, :vocab].float().log_softmax(-1)
            target = torch.tensor(cont, device=logp.device)
            logprob = float(logp.gather(-1, target[:, None]).double().sum())  # float64 sum: long documents
            scores.append((logprob, bool((logp.argmax(-1) == target).all())))
        return scores

    def _window(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The model's input: context + continuation less its last token, cut from the left to
        `max_length` (lm-eval's HFLM rule); the continuation itself must fit."""
        if len(cont) > self.max_length:
            raise ConfigError(f"a continuation of {len(cont)} tokens does not fit the window max_length="
                              f"{self.max_length}: raise max_length (--model_args max_length=N)")
        if len(ctx) + len(cont) > self.max_length + 1:
            log.warning("context of %d + continuation of %d tokens exceeds max_length=%d: the context is cut "
                        "from the left", len(ctx), len(cont), self.max_length)
        return (ctx + cont)[-(self.max_length + 1):][:-1]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of `max_length` tokens after EOS."""
        windows: list[Request] = []
        counts = []
        for (text,) in (r.args for r in requests):
            pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in pairs]
            counts.append(len(pairs))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm))
        totals = []
        for request, n in zip(requests, counts, strict=True):
            totals.append(sum(next(scores)[0] for _ in range(n)))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations in recurrent mode, cut at the stop
        strings. A batch holds prompts of one length only: padding would enter the SSM state."""
        order = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        out = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, kwargs = zip(*chunk, strict=True)
            texts = []
            for group in _same_length_runs(self._prompts(contexts, kwargs[0])):
                texts += self._generate(group, kwargs[0])
            for args, text in zip(chunk, texts, strict=True):
                self.cache_hook.add_partial("generate_until", args, text)
            out += texts
        return order.get_original(out)

    def _prompts(self, contexts: Sequence[str], gen_kwargs: dict) -> list[list[int]]:
        """Prompt tokens, cut from the left so that the generated tokens fit the window."""
        room = self.max_length - normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)["max_gen_toks"]
        if room < 1:
            raise ConfigError(f"max_gen_toks leaves no room for a prompt in max_length={self.max_length}: raise "
                              "max_length (--model_args max_length=N)")
        return [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]

    def _generate(self, prompts: list[list[int]], gen_kwargs: dict) -> list[str]:
        """Continuations of prompts of one length, each cut at EOS and at the first stop string."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [s for s in kwargs["until"] if s]
        ids = torch.tensor(prompts, device=self.device)
        new = generate(self.model, ids, kwargs["max_gen_toks"], sampling_config(kwargs),
                       vocab_size=self.model.cfg.vocab_size, eos_id=self.eot_token_id,
                       stop=self._stopper(until) if until else None)[:, ids.shape[1]:]
        texts = []
        for row in new.tolist():
            row = row[:row.index(self.eot_token_id)] if self.eot_token_id in row else row
            texts.append(postprocess_generated_text(self.tokenizer.decode(row), until, None))
        return texts

    def _stopper(self, until: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        """For `generate`: which sequences already hold a stop string."""
        def done(new: torch.Tensor) -> torch.Tensor:
            texts = [self.tokenizer.decode(row) for row in new.tolist()]
            return torch.tensor([any(s in t for s in until) for t in texts], device=new.device)
        return done


def _same_length_runs(prompts: list[list[int]]) -> Iterator[list[list[int]]]:
    """Consecutive prompts of equal length (the Collator sorts by length, so runs are long)."""
    start = 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or len(prompts[i]) != len(prompts[start]):
            yield prompts[start:i]
            start = i


def sampling_config(kwargs: dict) -> SamplingConfig:
    """lm-eval's generation kwargs as Hippo's sampling; ones Hippo cannot honour are named once."""
    ignored = sorted(set(kwargs) - SAMPLING_KWARGS - {"until", "max_gen_toks"})
    if ignored:
        log.warning("generation kwargs %s are not supported by the hippo model and are ignored", ignored)
    if not kwargs.get("do_sample"):
        return SamplingConfig(greedy=True)
    return SamplingConfig(temperature=float(kwargs.get("temperature", 1.0)), top_k=int(kwargs.get("top_k") or 0),
                          top_p=float(kwargs.get("top_p") or 1.0))


def check_batch_size(batch_size: int | str) -> int:
    try:
        size = int(batch_size)
    except (TypeError, ValueError):
        raise ConfigError(f"--batch-size (batch_size) must be a whole number >= 1, got {batch_size!r} "
                          "(lm-eval's 'auto' is not supported by the hippo model)") from None
    if size < 1:
        raise ConfigError(f"--batch-size (batch_size) must be >= 1, got {size}")
    return size


def check_max_length(max_length: int | None, model: HippoLM) -> int | None:
    cfg = model.cfg
    if max_length is None:
        return None
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 tokens, got {max_length}")
    if cfg.position_embedding == "learned" and max_length > cfg.max_position_embeddings:
        raise ConfigError(f"max_length={max_length} exceeds the model's learned positions "
                          f"(model.max_position_embeddings={cfg.max_position_embeddings})")
    return max_length


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b']."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError("--tasks names no task: give lm-eval task names, e.g. --tasks lambada_openai,piqa")
    return names


def task_manager(names: list[str], include_path: str | Path | None) -> Any:
    """lm-eval's task index. Tasks all found under `include_path` are indexed from it alone:
    lm-eval's own 14,000 tasks take seconds to index."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        include_path = str(include_path)
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path}: no such folder")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.all_subtasks for n in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        where = f" nor under --include-path {include_path}" if include_path else ""
        raise ConfigError(f"--tasks: no task {', '.join(unknown)} among lm-eval's tasks{where}; "
                          "`lm-eval ls tasks` lists them")
    return manager


@contextmanager
def preserved_rng() -> Iterator[None]:
    """lm-eval seeds the global python, numpy and torch generators; a training run that
    evaluates midway must get its own streams back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate_tasks(model: HippoLM, tokenizer: Tokenizer, tasks: str | Sequence[str], *,
                   num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
                   include_path: str | Path | None = None, max_length: int | None = None,
                   bootstrap_iters: int = 100_000, source: str | None = None) -> dict:
    """lm-eval's results (`results`, `versions`, `n-shot`, `configs`, `config`, ...) of the tasks
    on `model`, which is left in the train/eval mode it came in, with the RNG streams it had.

    `limit`: examples per task (a fraction when < 1); `num_fewshot`: None keeps each task's own;
    `source`: what the results' `config.model_source` records (an export folder, a run's step).
    """
    from lm_eval import simple_evaluate

    names = parse_tasks(tasks)
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot (num_fewshot) must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit (limit) must be > 0 (a count, or a fraction below 1), got {limit}")
    lm = HippoEvalLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, source=source)
    manager = task_manager(names, include_path)
    was_training = model.training
    model.eval()
    try:
        with preserved_rng():
            return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                   batch_size=batch_size, task_manager=manager, log_samples=False,
                                   bootstrap_iters=bootstrap_iters)
    except ConnectionError as e:
        raise TaskDataError(f"{e}: lm-eval fetches each task's data from the Hugging Face hub; offline, copy "
                            "~/.cache/huggingface from a machine that ran the task and set HF_DATASETS_OFFLINE=1 "
                            "HF_HUB_OFFLINE=1, or pass --include-path DIR with task YAMLs over local files "
                            "(README, Evaluation)") from e
    finally:
        model.train(was_training)


def save_results(results: dict, path: Path) -> Path:
    """The results as JSON (task configs hold functions and numpy values: written as text)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


def results_table(results: dict) -> str:
    """lm-eval's console table of the tasks (and of groups, when any)."""
    from lm_eval.utils import make_table

    return make_table(results) + (make_table(results, "groups") if results.get("groups") else "")


def task_metrics(results: dict) -> dict[str, float]:
    """{"piqa/acc": 0.61, ...}: the numeric metrics of every task (stderrs left out), for a tracker."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr"):
                out[f"{task}/{name}"] = float(value)
    return out


def register() -> None:
    """Makes `hippo` a model name of lm-eval (idempotent). lm-eval's built-in models are
    registered first: its `get_model` adds them only to an empty registry."""
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="hippo.pretrain.lm_eval_model:HippoEvalLM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with `--model hippo` known to it."""
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


register()

if __name__ == "__main__":
    main()
