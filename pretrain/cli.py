"""The `hippo` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from hippo.pretrain.config import ConfigError


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from hippo.pretrain.synthetic import SyntheticConfig, run

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    cfg = SyntheticConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    result = run(cfg, progress=not args.no_progress)
    print(
        f"task={cfg.task} mixer={cfg.mixer} loss={cfg.loss} epochs={result['epochs']} "
        f"val_accuracy={result['val_accuracy']:.3f} seconds={result['seconds']:.1f}"
    )
    print(f"test_accuracy={result['test_accuracy']:.3f}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from hippo.pretrain.config import load_config
    from hippo.pretrain.models import count_parameters

    for path in args.configs:
        cfg = load_config(path, args.set)
        print(f"{path}: {count_parameters(cfg.model) / 1e6:.2f}M parameters ({cfg.model.layer_mixers.count('attention')} attention layers)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from hippo.pretrain.config import load_config
    from hippo.pretrain.stopping import StopReason
    from hippo.pretrain.trainer import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem
    result = train(cfg, run_dir, resume=args.resume)
    return 1 if result.stopped_by is StopReason.NON_FINITE else 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hippo.data_pipeline.tokenizer import load_tokenizer
    from hippo.pretrain.export import load_export
    from hippo.pretrain.models.generation import SamplingConfig, generate

    model, meta = load_export(Path(args.model))
    tok = load_tokenizer(meta["tokenizer"])
    sampling = SamplingConfig(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        prompt = torch.tensor([tok.encode(args.prompt)])
        out = generate(model, prompt, args.max_new_tokens, sampling, vocab_size=model.cfg.vocab_size, generator=gen,
                       eos_id=tok.eos_id)
        text = tok.decode(out[0, prompt.shape[1]:].tolist())
        print(f"--- sample {i + 1}\n{args.prompt}{text}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from hippo.pretrain.evaluation import evaluate_export

    loss, tokens = evaluate_export(Path(args.model), args.data, split=args.split, max_batches=args.batches)
    print(f"{args.split}: {tokens:,} tokens, loss {loss:.4f}, perplexity {__import__('math').exp(loss):.2f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from hippo.pretrain.checkpoint import CheckpointManager
    from hippo.pretrain.export import export_checkpoint

    ckpt = CheckpointManager(Path(args.checkpoint)).resolve(args.checkpoint)
    out = export_checkpoint(ckpt, Path(args.output))
    print(f"exported step {ckpt.step} of {ckpt.path} to {out}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from hippo.pretrain.quickstart import quickstart

    quickstart(Path(args.run_dir), overrides=args.set)
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
    p.add_argument("--d-model", dest="d_model", type=int)
    p.add_argument("--n-layer", dest="n_layer", type=int)
    p.add_argument("--loss", choices=["all", "last"], help="next-token loss on every position (default) or the answer only")
    p.add_argument("--stop-accuracy", dest="stop_accuracy", type=float, help="early stop on validation accuracy")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_synthetic)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hippo", description="Pretraining for H3 and hybrid SSM language models")
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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="consolidate a checkpoint (any layout) into one safetensors file + config")
    p.add_argument("checkpoint", help="a run folder (its latest checkpoint), a checkpoints folder or a global_stepN folder")
    p.add_argument("--output", "-o", required=True)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quickstart", help="train a tiny hybrid on the embedded corpus, evaluate it, sample from it")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override tiny_hybrid.yaml")
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser("generate", help="sample text from an exported model (<run dir>/export)")
    p.add_argument("model", help="export folder written at the end of `hippo train`")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="loss and perplexity of an exported model on prepared data")
    p.add_argument("model", help="export folder")
    p.add_argument("--data", required=True, nargs="+", help="prepared folder(s)")
    p.add_argument("--split", default="validation", choices=["train", "validation"])
    p.add_argument("--batches", type=int, default=None, help="stop after this many batches of 8")
    p.set_defaults(func=_cmd_eval)

    from hippo.data_pipeline import cli as data_cli
    from hippo.launch import cli as launch_cli

    data_cli.register(sub)
    launch_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"hippo: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
