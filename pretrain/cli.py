"""The `hippo` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from pretrain.config import ConfigError


def _cmd_synthetic(args: argparse.Namespace) -> int:
    from pretrain.synthetic import SyntheticConfig, run

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    cfg = SyntheticConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    result = run(cfg, progress=not args.no_progress)
    print(
        f"task={cfg.task} mixer={cfg.mixer} epochs={result['epochs']} "
        f"val_accuracy={result['val_accuracy']:.3f} seconds={result['seconds']:.1f}"
    )
    print(f"test_accuracy={result['test_accuracy']:.3f}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.models import count_parameters

    for path in args.configs:
        cfg = load_config(path, args.set)
        print(f"{path}: {count_parameters(cfg.model) / 1e6:.2f}M parameters ({cfg.model.layer_mixers.count('attention')} attention layers)")
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

    from data_pipeline import cli as data_cli

    data_cli.register(sub)
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
