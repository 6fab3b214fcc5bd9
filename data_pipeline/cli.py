"""`hippo data ...`: prepare, inspect, verify, index, train-tokenizer, default-corpus.

`register(subparsers)` adds the `data` command to the main `hippo` parser; every handler takes
the parsed args and returns an exit code (0 ok, 1 verification failed, 2 bad input or options).
`python -m data_pipeline.cli data ...` runs the same commands without the rest of Hippo.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .errors import BadRecordError, EmptyDatasetError, ManifestError, ShardFetchError

__all__ = ["register", "main", "parse_size"]

_EXPECTED_ERRORS = (ValueError, FileExistsError, FileNotFoundError, BadRecordError, EmptyDatasetError, ManifestError,
                    ShardFetchError)


def parse_size(text: str) -> int:
    """'256M', '1.5G', '64KiB', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64K, 256M, 1G)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _fail(e: BaseException) -> int:
    print(f"hippo: error: {e}", file=sys.stderr)
    return 2


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    try:
        m = prepare(args.inputs, Path(args.output), tokenizer=args.tokenizer, seq_len=args.seq_len,
                    workers=args.workers, shard_bytes=args.shard_size, val_fraction=args.val_fraction,
                    val_inputs=args.val_inputs or (), split_seed=args.split_seed, strict=args.strict,
                    overwrite=args.overwrite, eos_token=args.eos_token, encoding=args.encoding,
                    errors=args.errors, progress=not args.no_progress)
    except _EXPECTED_ERRORS as e:
        return _fail(e)
    for name, s in m.splits.items():
        if s.shards:
            print(f"{name}: {s.samples} samples ({s.tokens} tokens) in {len(s.shards)} shards")
    if (args.val_fraction or args.val_inputs) and not m.splits["validation"].samples:
        print(f"validation: empty: the held-out records (--val-fraction {args.val_fraction}) fill no window of "
              f"seq_len {args.seq_len}; raise --val-fraction (or pass --val-inputs) to have a validation split")
    skipped = m.skipped()
    print("skipped: " + (", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"))
    print(f"manifest: {Path(args.output) / 'manifest.json'}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import decoded_samples, summarize
    from .manifest import load_manifest

    try:
        m = load_manifest(args.dir)
        print(summarize(m, args.dir))
        if args.samples:
            print(f"first {args.samples} samples of {args.split}, decoded:")
            for i, text in enumerate(decoded_samples(args.dir, split=args.split, count=args.samples)):
                print(f"--- sample {i} ---\n{text}")
    except _EXPECTED_ERRORS as e:
        return _fail(e)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .inspection import verify

    try:
        report = verify(args.dir, progress=not args.no_progress)
    except _EXPECTED_ERRORS as e:
        return _fail(e)
    for p in report.problems:
        print(f"PROBLEM {p}")
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"verify {args.dir}: {report.shards} shards, {report.samples} samples: {status}")
    return 0 if report.ok else 1


def _cmd_index(args: argparse.Namespace) -> int:
    from .sample_index import index_folder

    try:
        m = index_folder(args.dir, progress=not args.no_progress)
    except _EXPECTED_ERRORS as e:
        return _fail(e)
    for name, s in m.splits.items():
        if s.index:
            print(f"{name}: {s.index['name']} ({s.samples} samples in {len(s.shards)} shards)")
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .prepare import resolve_inputs
    from .sources import iter_texts
    from .tokenizer import train_bpe_tokenizer

    try:
        texts = iter_texts(resolve_inputs(args.inputs), args.max_docs)
        tok = train_bpe_tokenizer(texts, Path(args.output), vocab_size=args.vocab_size,
                                  min_frequency=args.min_frequency, eos_token=args.eos_token)
    except _EXPECTED_ERRORS as e:
        return _fail(e)
    print(f"wrote {args.output}: vocab {tok.vocab_size}, eos {tok.eos_id}, hash {tok.identity_hash}")
    return 0


def _cmd_default_corpus(args: argparse.Namespace) -> int:
    from .default_corpus import write_default_corpus

    try:
        path = write_default_corpus(Path(args.output), args.max_bytes)
    except _EXPECTED_ERRORS as e:
        return _fail(e)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


def register(subparsers) -> None:
    """Add `data` with its subcommands to an argparse subparsers object."""
    data = subparsers.add_parser("data", help="prepare, inspect and verify tokenized training data")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("prepare", help="tokenize text files into webdataset shards (resumable)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl, .jsonl.zst or .txt files, or folders of them")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or a tokenizer.json path")
    p.add_argument("--seq-len", type=int, required=True, help="model context; windows hold seq_len + 1 tokens")
    p.add_argument("--workers", type=int, default=1, help="tokenization processes (default 1)")
    p.add_argument("--shard-size", type=parse_size, default=None,
                   help="target shard size, e.g. 256M (default: 256M for large inputs, down to 1M for small ones)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of records held out as validation")
    p.add_argument("--val-inputs", nargs="+", metavar="INPUT", help="files that form the validation split")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out record choice")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (file and line)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --output")
    p.add_argument("--eos-token", help="end-of-document token of a tokenizer.json (default: auto)")
    p.add_argument("--encoding", default="utf-8", metavar="ENC", help="text encoding of the inputs (default utf-8)")
    p.add_argument("--errors", default="strict", choices=("strict", "replace"),
                   help="text that does not decode: strict skips and counts the record (.txt: the file), "
                        "replace keeps it with U+FFFD (default strict)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("inspect", help="print a prepared folder's manifest summary and decode a few samples")
    p.add_argument("dir", metavar="DIR", help="prepared folder (path or URL)")
    p.add_argument("--samples", type=int, default=3, help="samples to decode (default 3)")
    p.add_argument("--split", default="train", choices=("train", "validation"))
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("verify", help="re-check every shard and the sample index against the manifest (size, sha256, samples)")
    p.add_argument("dir", metavar="DIR", help="prepared folder (path or URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("index", help="(re)build the sample index of a folder prepared before Hippo wrote one")
    p.add_argument("dir", metavar="DIR", help="prepared folder (local path)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on your text")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl, .jsonl.zst or .txt files, or folders")
    p.add_argument("--output", "-o", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, EOS included (>= 257)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)")
    p.add_argument("--max-docs", type=int, help="train on at most this many documents")
    p.add_argument("--eos-token", default="<|endoftext|>", help="end-of-document token (default <|endoftext|>)")
    p.set_defaults(func=_cmd_train_tokenizer)

    p = sub.add_parser("default-corpus", help="write the embedded default corpus (Python stdlib sources) as .jsonl")
    p.add_argument("--output", "-o", required=True, help=".jsonl file to write")
    p.add_argument("--max-bytes", type=parse_size, default="3M", help="size cap (default 3M)")
    p.set_defaults(func=_cmd_default_corpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
