"""The `hippo` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from hippo.pretrain.config import ConfigError

if TYPE_CHECKING:
    from hippo.data_pipeline.tokenizer import Tokenizer

DEBUG_ENV = "HIPPO_DEBUG"
# (module, exception names): failures whose message already names the file, shard or option. Looked
# up in sys.modules, never imported here: `hippo launch` must not load torch (hippo.pretrain.checkpoint).
USER_ERRORS = {
    "hippo.pretrain.checkpoint": ("CheckpointError",),
    "hippo.pretrain.tracking": ("TrackingError",),
    "hippo.pretrain.lm_eval_model": ("TaskDataError",),
    "hippo.pretrain.run_lock": ("RunLockedError",),
    "hippo.pretrain.models.pretrained": ("ModelFolderError",),
    "hippo.data_pipeline.errors": ("ManifestError", "ShardFetchError", "CorruptShardError", "BadRecordError",
                                   "DataExhaustedError", "CorruptDataError", "EmptyDatasetError"),
}
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError)


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from hippo.pretrain.synthetic import SyntheticConfig, run_seeds, summarize

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    cfg = SyntheticConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    seeds = _parse_seeds(args.seeds) if args.seeds else [cfg.seed]
    results = run_seeds(cfg, seeds, progress=not args.no_progress)
    for r in results:
        print(
            f"task={cfg.task} mixer={cfg.mixer} loss={cfg.loss} seed={r['seed']} epochs={r['epochs']} "
            f"best_epoch={r['best_epoch']} val_accuracy={r['val_accuracy']:.3f} "
            f"test_accuracy_last={r['test_accuracy_last']:.3f} test_accuracy={r['test_accuracy']:.3f} seconds={r['seconds']:.1f}"
        )
    if len(results) > 1:
        s = summarize(results)
        print(f"seeds={len(results)} mean_test_accuracy={s['mean']:.3f} min_test_accuracy={s['min']:.3f}")
    else:
        print(f"test_accuracy={results[0]['test_accuracy']:.3f}")
    return 0


def _parse_seeds(text: str) -> list[int]:
    """'1,2,3' or '1-5' (or a mix: '1-3,7')."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} repeats a seed")
    return seeds


def _cmd_params(args: argparse.Namespace) -> int:
    from hippo.pretrain.config import load_config
    from hippo.pretrain.models import count_parameters

    for path in args.configs:
        cfg = load_config(path, args.set)
        print(f"{path}: {count_parameters(cfg.model) / 1e6:.2f}M parameters ({cfg.model.layer_mixers.count('attention')} attention layers)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from hippo.pretrain.config import load_config, run_folder
    from hippo.pretrain.stopping import StopReason
    from hippo.pretrain.trainer import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, run_folder(args.config, args.run_dir), resume=args.resume,
                   allow_config_change=args.allow_config_change,
                   init_from=Path(args.init_from) if args.init_from else None)
    if result.stopped_by is StopReason.SIGNAL:
        return 128 + result.signal  # after its checkpoint: 130 for Ctrl-C, 143 for SIGTERM, as a shell reports
    return 1 if result.stopped_by is StopReason.NON_FINITE else 0


def _require_export(folder: Path) -> None:
    """`generate` and `eval` take what `hippo export` writes; a run or data folder gets the command that makes it."""
    from hippo.pretrain.export import CONFIG, WEIGHTS

    if (folder / CONFIG).is_file():
        return
    if (folder / "export" / CONFIG).is_file():
        hint = f"pass its export folder, {folder / 'export'}"
    elif (folder / "checkpoints").is_dir():
        hint = f"it is a training run without an export: make one with `hippo export {folder} -o {folder / 'export'}`"
    else:
        hint = "make one from a training run with `hippo export RUN_DIR -o DIR` and pass DIR"
    raise FileNotFoundError(f"{folder} holds no {WEIGHTS}, so it is not an exported model: {hint}")


def _export_tokenizer(folder: Path, meta: dict) -> Tokenizer:
    """The export's tokenizer; an older export names a training data folder, which may have moved."""
    from hippo.pretrain.export import CONFIG, export_tokenizer

    try:
        return export_tokenizer(folder, meta)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{folder / CONFIG}: its tokenizer {meta['tokenizer']!r} does not load ({e}); set "
                          "\"tokenizer\" there to the prepared training folder or its tokenizer.json") from e


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hippo.pretrain.devices import resolve_device
    from hippo.pretrain.export import load_export
    from hippo.pretrain.models.generation import SamplingConfig
    from hippo.pretrain.text_generation import generate_texts

    sampling = SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = _read_prompts(Path(args.prompts)) if args.prompts else [args.prompt]
    _require_export(Path(args.model))
    device = resolve_device(args.device, None)
    model, meta = load_export(Path(args.model), device=device)
    tok = _export_tokenizer(Path(args.model), meta)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for sample in range(args.num_samples):
        texts = generate_texts(model, tok, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                               batch_size=args.batch_size, generator=gen)
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            label = f"sample {sample + 1}" if len(prompts) == 1 else f"prompt {i + 1}, sample {sample + 1}"
            print(f"--- {label}\n{prompt}{text}")
    return 0


def _read_prompts(path: Path) -> list[str]:
    """One prompt per line (`\\n` in a line stands for a newline); blank lines are skipped."""
    prompts = [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts (one per line)")
    return prompts


# `hippo eval` options of one mode only (dest: flag); given to the other, they would go unused.
EVAL_DATA_OPTIONS = {"split": "--split", "batches": "--batches"}
EVAL_TASK_OPTIONS = {"num_fewshot": "--num-fewshot", "limit": "--limit", "batch_size": "--batch-size",
                     "include_path": "--include-path", "output": "--output"}
EVAL_RESULTS = "eval_results.json"


def _cmd_eval(args: argparse.Namespace) -> int:
    """Two modes: loss/perplexity on prepared data (--data), lm-eval benchmarks (--tasks)."""
    from hippo.pretrain.evaluation import evaluate_export

    _require_export(Path(args.model))
    _check_eval_mode(args)
    if args.tasks is not None:
        return _eval_tasks(args)
    split = args.split or "validation"
    from hippo.pretrain.devices import resolve_device

    loss, tokens = evaluate_export(Path(args.model), args.data, split=split, max_batches=args.batches,
                                   device=resolve_device(args.device, None))
    print(f"{split}: {tokens:,} tokens, loss {loss:.4f}, perplexity {__import__('math').exp(loss):.2f}")
    return 0


def _check_eval_mode(args: argparse.Namespace) -> None:
    mode, foreign = ("--tasks", EVAL_DATA_OPTIONS) if args.tasks is not None else ("--data", EVAL_TASK_OPTIONS)
    given = [flag for dest, flag in foreign.items() if getattr(args, dest) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: not an option of `hippo eval {mode}` (--split and --batches go "
                          "with --data; --num-fewshot, --limit, --batch-size, --include-path and --output "
                          "with --tasks; --device with both)")


def _eval_tasks(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--tasks runs lm-evaluation-harness, which is not installed: "
                          "pip install 'hippo-pretrain[eval]' (lm_eval>=0.4.13,<0.5)")
    from hippo.pretrain.export import load_export
    from hippo.pretrain.devices import resolve_device
    from hippo.pretrain.lm_eval_model import evaluate_tasks, results_table, save_results

    folder = Path(args.model)
    model, meta = load_export(folder, device=resolve_device(args.device, None))
    tok = _export_tokenizer(folder, meta)
    batch_size = 8 if args.batch_size is None else args.batch_size
    results = evaluate_tasks(model, tok, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=batch_size, include_path=args.include_path, source=str(folder))
    out = save_results(results, Path(args.output) if args.output else folder / EVAL_RESULTS)
    print(results_table(results))
    print(f"results written to {out}")
    return 0


def _count_or_fraction(text: str) -> float | int:
    """--limit: a number of examples, or a fraction of each task below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or a fraction, got {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def _cmd_export(args: argparse.Namespace) -> int:
    from hippo.pretrain.checkpoint import CheckpointManager
    from hippo.pretrain.export import export_checkpoint

    if args.format == "hf":
        from hippo.pretrain.hf_export import export_hf

        out = export_hf(Path(args.checkpoint), Path(args.output))
        print(f"wrote {out} (a Hugging Face transformers folder: AutoModelForCausalLM.from_pretrained(DIR, "
              f"trust_remote_code=True)) from {args.checkpoint}")
        return 0
    if args.format == "h3":
        from hippo.pretrain.h3_checkpoint import export_h3

        out = export_h3(Path(args.checkpoint), Path(args.output))
        print(f"wrote {out} (the authors' H3 layout) from {args.checkpoint}")
        return 0
    ckpt = CheckpointManager(Path(args.checkpoint)).resolve(args.checkpoint)
    out = export_checkpoint(ckpt, Path(args.output))
    print(f"exported step {ckpt.step} of {ckpt.path} to {out}")
    return 0


def _cmd_import_h3(args: argparse.Namespace) -> int:
    from hippo.pretrain.h3_checkpoint import import_h3

    result = import_h3(Path(args.checkpoint), Path(args.output), tokenizer=args.tokenizer, config=args.config,
                       n_head=args.n_head, trust_pickle=args.trust_pickle)
    for note in result.notes:
        print(f"note: {note}")
    m = result.model
    print(f"imported {args.checkpoint} to {result.folder}: d_model {m.d_model}, {m.n_layer} layers, attention at "
          f"{m.attn_layer_idx} ({m.n_head} heads), position {m.position_embedding}, vocabulary {m.vocab_size}")
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from hippo.pretrain.hf_export import import_hf

    out = import_hf(Path(args.folder), Path(args.output))
    print(f"imported {args.folder} to {out}")
    return 0


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn another code base's checkpoint into a Hippo export")
    isub = p.add_subparsers(dest="import_format", required=True)
    p = isub.add_parser("h3", help="the authors' released H3 checkpoints (HazyResearch/H3, danfu09/H3-*)")
    p.add_argument("checkpoint", help="model.pt / model-3attn.pt / ...: a state dict or a Lightning checkpoint")
    p.add_argument("--output", "-o", required=True, help="export folder to write")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--config", help="shipped config (e.g. h3_125m, hybrid_355m) or YAML: attention heads "
                       "and training settings; its sizes must match the checkpoint")
    heads.add_argument("--n-head", type=int, help="attention heads (the tensors do not show them)")
    p.add_argument("--tokenizer", help="the model's tokenizer.json (GPT-2's for the released models), or byte")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a file that holds Python objects besides tensors (runs its code: trusted files only)")
    p.set_defaults(func=_cmd_import_h3)
    p = isub.add_parser("hf", help="a Hugging Face folder of a Hippo model (`hippo export --format hf`)")
    p.add_argument("folder", help="the folder: config.json (model_type hippo), safetensors weights, tokenizer")
    p.add_argument("--output", "-o", required=True, help="export folder to write")
    p.set_defaults(func=_cmd_import_hf)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from hippo.pretrain.quickstart import quickstart

    quickstart(Path(args.run_dir), overrides=args.set)
    return 0


def _cmd_mlflow_upload(args: argparse.Namespace) -> int:
    from hippo.pretrain.tracking import PENDING_FILE, upload_pending

    n = upload_pending(Path(args.run_dir), args.tracking_uri)
    print(f"uploaded {n} records of {Path(args.run_dir) / PENDING_FILE} to MLflow")
    return 0


def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthetic", help="train a 2-layer model on the paper's synthetic languages")
    p.add_argument("--task", choices=["associative_recall", "induction_head"], default="associative_recall")
    p.add_argument("--mixer", choices=["h3", "s4d", "attention"], default="h3")
    p.add_argument("--vocab-size", dest="vocab_size", type=int)
    p.add_argument("--seq-len", dest="seq_len", type=int, help="induction head: random tokens before the query")
    p.add_argument("--num-pairs", dest="num_pairs", type=int, help="associative recall: key-value pairs")
    p.add_argument("--num-train", dest="num_train", type=int)
    p.add_argument("--num-val", dest="num_val", type=int)
    p.add_argument("--num-test", dest="num_test", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW decay on all but the SSM dynamics (default 0.1)")
    p.add_argument("--warmup-fraction", dest="warmup_fraction", type=float, help="linear warmup over this share of the epochs (default 0.1)")
    p.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float,
                   help="the cosine ends at lr x this (default 0.1; 1 holds the lr after the warmup)")
    p.add_argument("--d-model", dest="d_model", type=int)
    p.add_argument("--n-layer", dest="n_layer", type=int)
    p.add_argument("--loss", choices=["all", "last"], help="next-token loss on every position (default) or the answer only")
    p.add_argument("--stop-accuracy", dest="stop_accuracy", type=float, help="early stop on validation accuracy")
    p.add_argument("--grad-clip", dest="grad_clip", type=float, help="per-seed gradient-norm clip (default 0: none, as the authors)")
    p.add_argument("--embed-dropout", dest="embed_dropout", type=float, help="embedding dropout (default 0.1, as the authors)")
    p.add_argument("--attn-dropout", dest="attn_dropout", type=float, help="attention-probability dropout (default 0.1)")
    p.add_argument("--s4d-glu", dest="s4d_glu", action="store_true", default=None,
                   help="S4D baseline with Hippo's GLU output map instead of the authors' plain one")
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", help="several seeds trained together as one batched ensemble: '1,2,3' or '1-5'")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_synthetic)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hippo", description="Pretraining for H3 and hybrid SSM language models")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of a failure instead of one line, and the libraries' own start-up "
                        f"output (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synthetic(sub)
    p = sub.add_parser("params", help="parameter counts of configs, without allocating them")
    p.add_argument("configs", nargs="+", help="YAML paths or shipped config names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("train", help="pretrain a model (one process, or every rank under torchrun / deepspeed)")
    p.add_argument("config", help="YAML run config (path or shipped name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--run-dir", help="run folder: checkpoints, metrics.jsonl, MLflow store (default runs/<config>)")
    p.add_argument("--resume", help="checkpoint (global_stepN, checkpoints or run folder) to resume from "
                   "(default: the run folder's latest, if any)")
    p.add_argument("--init-from", metavar="EXPORT", help="start from this export's weights (`hippo export`, "
                   "`hippo import h3`) with a fresh optimizer, in any parallel layout; ignored once the run has a checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although settings that change the training (steps, lr schedule, data, intervals, "
                   "tracking) differ from the checkpoint's; the model's architecture can never change")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="consolidate a checkpoint (any layout) into one safetensors file + config")
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint), a checkpoints folder or a global_stepN folder")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--format", choices=["hippo", "h3", "hf"], default="hippo",
                   help="hippo: an export folder; h3: the authors' H3 layout (model.pt + h3_config.json); hf: a "
                   "Hugging Face transformers folder (AutoModelForCausalLM, trust_remote_code); h3 and hf from a "
                   "checkpoint or an export folder")
    p.set_defaults(func=_cmd_export)
    _add_import(sub)

    p = sub.add_parser("quickstart", help="train a tiny hybrid on the embedded corpus, evaluate it, sample from it")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override tiny_hybrid.yaml")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("generate", help="sample text from an exported model (<run dir>/export)")
    p.add_argument("model", help="export folder written at the end of `hippo train`")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line (instead of --prompt)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (equal token lengths)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="an exported model's loss and perplexity on prepared data (--data), or its "
                       "zero/few-shot benchmark scores through lm-evaluation-harness (--tasks)")
    p.add_argument("model", help="export folder")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--data", nargs="+", help="prepared folder(s): loss and perplexity")
    mode.add_argument("--tasks", help="lm-eval task names, comma-separated (e.g. lambada_openai,hellaswag,piqa,"
                      "arc_easy,arc_challenge,winogrande)")
    p.add_argument("--split", choices=["train", "validation"], help="--data: the split (default validation)")
    p.add_argument("--batches", type=int, default=None, help="--data: stop after this many batches of 8")
    p.add_argument("--num-fewshot", type=int, help="--tasks: examples in each prompt (default: each task's own, "
                   "mostly 0)")
    p.add_argument("--limit", type=_count_or_fraction, help="--tasks: examples per task (a fraction when below 1)")
    p.add_argument("--batch-size", type=int, help="--tasks: requests per forward pass (default 8; results do not "
                   "depend on it)")
    p.add_argument("--include-path", help="--tasks: a folder of task YAMLs of your own (e.g. offline copies)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when there is one")
    p.add_argument("--output", help=f"--tasks: results JSON (default <model>/{EVAL_RESULTS})")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("mlflow", help="MLflow records of training runs")
    msub = p.add_subparsers(dest="mlflow_command", required=True)
    p = msub.add_parser("upload", help="send the records a run kept while its tracking server was unreachable")
    p.add_argument("run_dir", help="the run folder (--run-dir of `hippo train`) holding mlflow_pending.jsonl")
    p.add_argument("--tracking-uri", help="where to send them (default: $MLFLOW_TRACKING_URI, else the run "
                   "folder's own sqlite store)")
    p.set_defaults(func=_cmd_mlflow_upload)

    from hippo.data_pipeline import cli as data_cli
    from hippo.launch import cli as launch_cli

    data_cli.register(sub)
    launch_cli.register(sub)
    return parser


def _yaml_message(e: yaml.YAMLError) -> str:
    """yaml's several-line report as one line naming the file (or --set value), line and column."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is None:
        return f"invalid YAML: {problem}"
    if mark.name.startswith("<"):  # a string, i.e. a --set value
        return f"a --set value is not valid YAML: {problem} at column {mark.column + 1}"
    context = getattr(e, "context", None)
    where = f" ({context} at line {e.context_mark.line + 1})" if context and e.context_mark else ""
    return f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: {problem}{where}; fix the YAML there"


def _user_error(e: BaseException) -> tuple[str, int] | None:
    """The message and exit code of a failure the user can fix (2: configuration), None for a bug."""
    if isinstance(e, ConfigError):
        return str(e), 2
    if isinstance(e, yaml.YAMLError):
        return _yaml_message(e), 2
    hippo_errors = tuple(getattr(sys.modules[m], name) for m, names in USER_ERRORS.items() if m in sys.modules
                         for name in names if hasattr(sys.modules[m], name))
    if isinstance(e, hippo_errors):
        return str(e), 1
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on {e.filename or 'the device'}: free some space or write somewhere else", 1
    if isinstance(e, FILE_ERRORS):
        return (f"{e.filename}: {e.strerror}" if e.filename else str(e)), 1
    return None


def _reported_by_another_rank(e: BaseException) -> bool:
    """An error every rank of a job raises alike (the run lock's refusal) is printed by rank 0 only."""
    return getattr(e, "same_on_every_rank", False) and os.environ.get("RANK", "0") != "0"


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def configure_logging(debug: bool) -> None:
    """Hippo's own lines at INFO; the libraries' (Megatron, MLflow, DeepSpeed) only from WARNING,
    and DeepSpeed's start-up prints not at all (`parallel.deepspeed_compat.quiet`). With `debug`,
    everything: Hippo at DEBUG (which shows what DeepSpeed printed), the libraries at INFO."""
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hippo").setLevel(logging.DEBUG if debug else logging.INFO)
    # MLflow installs its own handler at import, at the level this variable names (its public knob).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if debug else "WARNING")


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand. A failure the user can fix ends in one `hippo: error:` line on stderr
    (every rank under torchrun prints its own); --debug or HIPPO_DEBUG=1 shows the traceback."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    configure_logging(debug)
    try:
        return args.func(args)
    except Exception as e:
        reported = _user_error(e)
        if reported is None or debug:
            raise
        message, code = reported
        if not _reported_by_another_rank(e):
            print(f"hippo: error: {_one_line(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
