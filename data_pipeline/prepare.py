"""`hippo data prepare`: text files -> tokenized, packed, compressed webdataset shards + manifest.

The main process reads records in input order and hands batches of documents to worker
processes for tokenization; results come back in order, so the output does not depend on the
number of workers. Each split (train / validation) has its own packer and shard sequence.

Resume: after each shard is renamed to its final name, a line is appended to
`prepare.journal.jsonl` with the shard's checksum, the split's packer statistics and the input
position (file, line, token offset) its next window starts at. A rerun re-reads the input from
the earliest such position over the splits and redoes only what no finished shard covers.
Tokenization is deterministic, so redone shards are byte-identical to what an uninterrupted run
writes. The manifest is written last, atomically; the journal is then removed.

A fresh run (or --overwrite) removes the folder's previous dataset only when it is about to
write its first shard, so a run that produces nothing (empty or unusable inputs: EmptyDatasetError)
leaves what was there untouched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import BadRecordError, EmptyDatasetError
from .journal import JOURNAL_NAME, Journal, explain_mismatch, fingerprint, read_journal, valid_prefix
from .manifest import MANIFEST_NAME, Manifest, SplitInfo, load_manifest, write_json_atomic
from .sample_index import build_split_index, index_folder, index_name
from .packing import Packer, Position
from .shard_io import ShardInfo, ShardWriter, dtype_for_vocab
from .sources import SUPPORTED_SUFFIXES, check_encoding, input_kind, iter_records
from .tokenizer import HFTokenizer, Tokenizer, load_tokenizer

__all__ = ["prepare", "resolve_inputs", "split_of", "auto_shard_bytes", "JOURNAL_NAME", "DEFAULT_SHARD_BYTES",
           "SPLITS"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 << 20
MIN_AUTO_SHARD_BYTES = 1 << 20
SPLITS = ("train", "validation")
SOURCE_INFO_SUFFIX = ".source.json"
_MAX_WARNINGS = 50
_BATCH_TEXT_BYTES = 4 << 20


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Input files in the order given; a folder stands for its supported files, sorted."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(SUPPORTED_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"input folder {p} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
            out.extend(found)
        elif p.is_file():
            input_kind(p)  # raises for unsupported types
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def split_of(name: str, line: int, *, val_fraction: float, val_file: bool, split_seed: int) -> str:
    """The split of one record: by source file, else by a hash of (file name, line).

    Hashing (not counting) makes the choice independent of worker count, resume point and
    of the other files in the run.
    """
    if val_file:
        return "validation"
    if val_fraction <= 0.0:
        return "train"
    h = hashlib.blake2b(f"{split_seed}:{name}:{line}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(h, "little") < val_fraction * 2.0**64 else "train"


def auto_shard_bytes(files: list[Path]) -> int:
    """A shard size giving a small corpus a few dozen shards, the Pile 256 MiB ones.

    Verification, indexing and (over HTTP) requests go per shard, so many small shards cost little
    and a corpus in one huge shard gains nothing. Shards hold ~2-4 bytes per token against ~4 bytes of text
    per token (zstd inputs: ~4x more text than file bytes), so the input size is a fair guide.
    """
    text_bytes = sum(p.stat().st_size * (4 if p.name.endswith(".zst") else 1) for p in files)
    return int(min(DEFAULT_SHARD_BYTES, max(MIN_AUTO_SHARD_BYTES, text_bytes // 32)))


# ---------------------------------------------------------------- tokenization workers

_WORKER_TOK: Tokenizer | None = None


def _init_worker(spec: str, eos_token: str | None) -> None:
    global _WORKER_TOK
    # One worker = one core: the Rust tokenizer must not start its own thread pool per process.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOK = load_tokenizer(spec, eos_token=eos_token)


def _tokenize(tok: Tokenizer, texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids, each followed by EOS, flattened; plus each document's length."""
    arrays = tok.encode_batch(texts)
    lengths = np.fromiter((len(a) + 1 for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    for a, end in zip(arrays, ends):
        flat[end - 1 - len(a):end - 1] = a
        flat[end - 1] = tok.eos_id
    if len(flat) and int(flat.max()) >= tok.vocab_size:
        raise ValueError(f"tokenizer {tok.spec} produced id {int(flat.max())} >= vocab_size {tok.vocab_size}")
    return flat, lengths


def _tokenize_in_worker(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_TOK is not None
    return _tokenize(_WORKER_TOK, texts, dtype)


# ---------------------------------------------------------------- the run


@dataclass(slots=True)
class _Item:
    """One record on its way through tokenization: a document, or a skipped record to count."""

    split: str
    file_index: int
    line: int
    text: str | None = None  # None for a skipped record
    set_name: str | None = None
    offset: int = 0  # tokens of this document already in finished shards (resumed runs)
    example: dict | None = None  # {"file", "line", "reason", "detail"} of a skipped record


class _Run:
    """State of one prepare run: packers, open shard writers, the journal, counters."""

    def __init__(self, out: Path, inputs: list[Path], tok: Tokenizer, *, seq_len: int, shard_bytes: int,
                 level: int, strict: bool, fingerprint: dict, resumed: list[dict]) -> None:
        self.out = out
        self.inputs = inputs
        self.tok = tok
        self.dtype = dtype_for_vocab(tok.vocab_size)
        self.shard_bytes = shard_bytes
        self.level = level
        self.strict = strict
        self.fingerprint = fingerprint
        # A resumed run keeps its journal; a fresh one starts it (and clears the old dataset) at its first shard.
        self.journal: Journal | None = Journal(out / JOURNAL_NAME, fingerprint, resumed) if resumed else None
        self.packers = {s: Packer(seq_len + 1, tok.eos_id, self.dtype) for s in SPLITS}
        self.writers: dict[str, ShardWriter | None] = {s: None for s in SPLITS}
        self.done: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
        self.start: dict[str, Position] = {s: (0, 1, 0) for s in SPLITS}
        for e in resumed:
            s = e["split"]
            self.done[s].append(ShardInfo(**e["shard"]))
            self.start[s] = tuple(e["position"])
            self.packers[s].stats = SplitInfo.from_dict(e["stats"])
        self.warnings = 0
        self.docs = 0
        self.tokens = 0

    def record_bad(self, fi: int, line: int, reason: str, detail: str) -> dict:
        """Log (or, with --strict, raise for) a bad record; returns its manifest example."""
        where = f"{self.inputs[fi]}:{line}"
        if self.strict:
            raise BadRecordError(f"{where}: {reason}: {detail} (remove --strict to skip and count bad records)")
        self.warnings += 1
        if self.warnings <= _MAX_WARNINGS:
            logger.warning("skipping %s: %s: %s", where, reason, detail)
        elif self.warnings == _MAX_WARNINGS + 1:
            logger.warning("more bad records: only counting them from now on (see the manifest)")
        return {"file": str(self.inputs[fi]), "line": line, "reason": reason, "detail": detail}

    def consume(self, items: list[_Item], flat: np.ndarray, lengths: np.ndarray) -> None:
        """Feed one tokenized batch (in input order) to the packers and write full windows."""
        ends = np.cumsum(lengths)
        d = 0
        for it in items:
            packer = self.packers[it.split]
            if it.text is None:
                packer.add_skip(it.file_index, it.line, it.example)
            else:
                toks = flat[ends[d] - lengths[d]:ends[d]]
                d += 1
                packer.add_document(it.file_index, it.line, toks, offset=it.offset,
                                    source=str(self.inputs[it.file_index]), set_name=it.set_name or "(none)")
                self.docs += 1
                self.tokens += len(toks) - it.offset
            for window in packer.windows():
                self._emit(it.split, window)

    def _emit(self, split: str, window: np.ndarray) -> None:
        w = self.writers[split]
        if w is None:
            if self.journal is None:
                _remove_old_dataset(self.out)
                self.journal = Journal(self.out / JOURNAL_NAME, self.fingerprint, [])
            name = f"{split}-{len(self.done[split]):06d}.tar"
            w = self.writers[split] = ShardWriter(self.out, name, self.dtype, self.level)
        w.add(window)
        if w.bytes >= self.shard_bytes:
            self._finish_shard(split)

    def _finish_shard(self, split: str) -> None:
        info = self.writers[split].close()
        self.writers[split] = None
        self.done[split].append(info)
        packer = self.packers[split]
        stats = copy.deepcopy(asdict(packer.stats))
        self.journal.append({"split": split, "shard": asdict(info), "position": list(packer.position()),
                             "stats": stats})

    def finish(self) -> None:
        for split in SPLITS:
            last = self.packers[split].final_window()
            if last is not None:
                self._emit(split, last)
            if self.writers[split] is not None:
                self._finish_shard(split)

    def abort(self) -> None:
        for w in self.writers.values():
            if w is not None:
                w.abort()

    def close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def skipped(self) -> dict[str, int]:
        """Skipped records per reason, over the splits."""
        out: dict[str, int] = {}
        for packer in self.packers.values():
            for reason, n in packer.stats.skipped.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def check_not_empty(self) -> None:
        """EmptyDatasetError (one line, with the skip counts) when no split got a sample."""
        if any(self.done[s] for s in SPLITS):
            return
        skipped = self.skipped()
        what = "the inputs hold no records"
        if skipped:
            what = "every record was skipped (" + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
            examples = [e for p in self.packers.values() for e in p.stats.skipped_examples]
            if examples:
                e = examples[0]
                what += f"; first: {e['file']}:{e['line']}: {e['reason']}: {e['detail']}"
            what += ")"
        hint = ("; text in another encoding needs --encoding ENC (or --errors replace)"
                if {"invalid_utf8", "invalid_encoding"} & set(skipped) else "")
        raise EmptyDatasetError(
            f"no samples from {len(self.inputs)} input file(s) ({', '.join(map(str, self.inputs[:3]))}"
            f"{', ...' if len(self.inputs) > 3 else ''}): {what}; nothing was written to {self.out}: fix the "
            f"inputs{hint}")


def _clean_temporary(out: Path) -> None:
    for p in out.iterdir():
        if p.name.endswith((".tar.tmp", ".json.tmp", ".index.tmp")):
            p.unlink()


def _remove_old_dataset(out: Path) -> None:
    """What an earlier prepare left in `out` (manifest first: the folder is no longer complete)."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    shard_prefixes = tuple(f"{s}-" for s in SPLITS)
    for p in out.iterdir():
        if p.name in ("tokenizer.json", *map(index_name, SPLITS)) or (
                p.name.endswith(".tar") and p.name.startswith(shard_prefixes)):
            p.unlink()


def prepare(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    tokenizer: str = "byte",
    seq_len: int,
    workers: int = 1,
    shard_bytes: int | None = None,
    val_fraction: float = 0.0,
    val_inputs: Sequence[str | Path] = (),
    split_seed: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    eos_token: str | None = None,
    encoding: str = "utf-8",
    errors: str = "strict",
    compression_level: int = 3,
    docs_per_batch: int = 256,
    progress: bool = True,
) -> Manifest:
    """Tokenize, pack and shard `inputs` into `output`; resumes an interrupted run in `output`.

    Args:
        inputs: .jsonl / .jsonl.zst / .txt files (or folders of them), read in this order.
        output: folder for shards, manifest.json (and tokenizer.json for tokenizer files).
        tokenizer: `byte` or a tokenizer.json path (see tokenizer.load_tokenizer).
        seq_len: model context; windows hold seq_len + 1 tokens (inputs and shifted targets).
        workers: tokenization processes; 1 tokenizes in this process.
        shard_bytes: a shard is closed once it reaches this size; None = `auto_shard_bytes`
            (256 MiB for large inputs, down to 1 MiB for small ones).
        val_fraction: fraction of records (chosen by a hash of file name and line) held out
            as the validation split.
        val_inputs: files whose records all go to validation (added to inputs if absent).
        strict: raise BadRecordError at the first bad record instead of skipping it.
        overwrite: replace a different prepared dataset already in `output`.
        encoding: text encoding of the inputs (`--encoding`).
        errors: `strict` skips (and counts) records that do not decode, `replace` keeps them
            with U+FFFD for the bad bytes (`--errors`).

    Returns:
        The manifest (also written to output/manifest.json).

    Raises:
        EmptyDatasetError: no input gave a document (empty, or every record skipped); `output`
            is left as it was.
    """
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"--shard-size must be >= 1 byte, got {shard_bytes}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    val_paths = resolve_inputs(val_inputs) if val_inputs else []
    files = resolve_inputs(list(inputs) + [str(p) for p in val_paths])
    encoding = check_encoding(encoding, errors, lines=any(input_kind(p)[0] == "jsonl" for p in files))
    val_set = {p.resolve() for p in val_paths}
    if shard_bytes is None:
        shard_bytes = auto_shard_bytes(files)
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    args = {"seq_len": seq_len, "shard_bytes": shard_bytes, "val_fraction": val_fraction,
            "split_seed": split_seed, "compression_level": compression_level, "format_version": 1}
    if (encoding, errors) != ("utf-8", "strict"):  # only then: folders prepared before these options still match
        args.update(encoding=encoding, errors=errors)
    fp = fingerprint(files, val_set, tok, args)

    if (out / MANIFEST_NAME).exists() and not overwrite:
        existing = load_manifest(str(out))
        if existing.prepare_args.get("fingerprint") == fp:
            if any(sp.shards and sp.index is None for sp in existing.splits.values()):
                logger.info("%s is already prepared with these inputs and options; adding its sample index", out)
                return index_folder(out, progress=progress)
            logger.info("%s is already prepared with these inputs and options; nothing to do", out)
            return existing
        raise FileExistsError(
            f"{out} already holds a prepared dataset made with different "
            f"{explain_mismatch(existing.prepare_args.get('fingerprint') or {}, fp)}; "
            "pass --overwrite to replace it or choose another --output"
        )
    header, entries = read_journal(out / JOURNAL_NAME)
    if header is not None and header != fp and not overwrite:
        raise FileExistsError(
            f"{out} holds an unfinished prepare run with different {explain_mismatch(header, fp)}; "
            "rerun it with the same inputs and options, or pass --overwrite to start over"
        )
    if overwrite or header != fp:
        entries = []
    _clean_temporary(out)
    entries = valid_prefix(out, entries)
    if entries:
        logger.info("resuming %s: %d finished shards kept", out, len(entries))

    run = _Run(out, files, tok, seq_len=seq_len, shard_bytes=shard_bytes, level=compression_level,
               strict=strict, fingerprint=fp, resumed=entries)
    t0 = time.perf_counter()
    try:
        _drive(run, files, val_set, val_fraction=val_fraction, split_seed=split_seed, workers=workers,
               tokenizer_spec=tok.spec, eos_token=eos_token, docs_per_batch=docs_per_batch, progress=progress,
               encoding=encoding, errors=errors)
        run.finish()
    except BaseException:
        run.abort()
        run.close_journal()
        raise
    run.close_journal()
    run.check_not_empty()
    elapsed = time.perf_counter() - t0

    tok_info = tok.identity()
    if isinstance(tok, HFTokenizer):
        # A copy travels with the shards, so a remote folder names a tokenizer the trainer can load.
        tmp = out / "tokenizer.json.tmp"
        tmp.write_text(tok.to_json(), encoding="utf-8")
        os.replace(tmp, out / "tokenizer.json")
        tok_info.update(file="tokenizer.json", eos_token=tok.eos_token)
    splits = {}
    for s in SPLITS:
        info = run.packers[s].stats
        info.shards = run.done[s]
        info.index = build_split_index(out, s, info) if info.shards else None
        splits[s] = info
    manifest = Manifest(
        seq_len=seq_len,
        dtype=run.dtype.name,
        tokenizer=tok_info,
        splits=splits,
        inputs=[_input_entry(p, p.resolve() in val_set, val_fraction) for p in files],
        prepare_args={**args, "fingerprint": fp, "python": sys.version.split()[0],
                      "last_run": {"seconds": round(elapsed, 3), "documents": run.docs, "tokens": run.tokens,
                                   "workers": workers,
                                   "tokens_per_s": round(run.tokens / max(elapsed, 1e-9), 1)}},
    )
    _remove_stale_shards(out, manifest)
    write_json_atomic(out / MANIFEST_NAME, manifest.to_dict())
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    logger.info("prepared %s: %s", out, ", ".join(f"{s} {splits[s].samples} samples in {len(splits[s].shards)} shards"
                                                 for s in SPLITS))
    logger.info("this run: %d documents, %d tokens in %.1fs = %.0f tokens/s (%.0f per worker)", run.docs,
                run.tokens, elapsed, run.tokens / max(elapsed, 1e-9), run.tokens / max(elapsed, 1e-9) / workers)
    return manifest


def _remove_stale_shards(out: Path, manifest: Manifest) -> None:
    listed = {sh.name for s in manifest.splits.values() for sh in s.shards}
    listed |= {s.index["name"] for s in manifest.splits.values() if s.index}
    for p in out.iterdir():
        stale_shard = p.name.endswith(".tar") and p.name.startswith(tuple(f"{s}-" for s in SPLITS))
        if (stale_shard or p.name in map(index_name, SPLITS)) and p.name not in listed:
            p.unlink()


def _input_entry(p: Path, is_val: bool, val_fraction: float) -> dict:
    entry = {"path": str(p), "bytes": p.stat().st_size,
             "split": "validation" if is_val else ("train+validation" if val_fraction > 0 else "train")}
    sidecar = p.with_name(p.name + SOURCE_INFO_SUFFIX)
    if sidecar.exists():
        entry["info"] = json.loads(sidecar.read_text(encoding="utf-8"))
    return entry


def _drive(run: _Run, files: list[Path], val_set: set[Path], *, val_fraction: float, split_seed: int,
           workers: int, tokenizer_spec: str, eos_token: str | None, docs_per_batch: int, progress: bool,
           encoding: str = "utf-8", errors: str = "strict") -> None:
    """Read records from the resume point on, tokenize in batches (in order), and pack."""
    from tqdm import tqdm

    resume = min(run.start.values())
    dtype = run.dtype.name
    pool = None
    if workers > 1:
        # fork on Linux: spawn would re-import the caller's __main__ (torch, the trainer) in every
        # worker, and would re-run an unguarded script. Workers only use numpy and tokenizers.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                        initargs=(tokenizer_spec, eos_token))
    pending: deque = deque()
    bar = tqdm(unit="doc", unit_scale=True, disable=not progress, desc="prepare", dynamic_ncols=True)
    t0 = time.perf_counter()

    def handle(items, result) -> None:
        flat, lengths = result
        run.consume(items, flat, lengths)
        bar.update(len(lengths))
        bar.set_postfix_str(f"{run.tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)

    def submit(items: list[_Item]) -> None:
        texts = [it.text for it in items if it.text is not None]
        if pool is None:
            handle(items, _tokenize(run.tok, texts, dtype))
            return
        pending.append((items, pool.apply_async(_tokenize_in_worker, (texts, dtype))))
        while len(pending) > 2 * workers:  # bounded read-ahead: input can be far larger than memory
            its, res = pending.popleft()
            handle(its, res.get())

    try:
        batch: list[_Item] = []
        batch_bytes = 0
        for fi, path in enumerate(files):
            if fi < resume[0]:
                continue
            is_val = path.resolve() in val_set
            first_line = resume[1] if fi == resume[0] else 1
            for rec in iter_records(path, start_line=first_line, encoding=encoding, errors=errors):
                split = split_of(path.name, rec.line, val_fraction=val_fraction, val_file=is_val,
                                 split_seed=split_seed)
                s0 = run.start[split]
                if (fi, rec.line) < (s0[0], s0[1]):
                    continue  # already in a finished shard of this split
                if rec.text is None:
                    example = run.record_bad(fi, rec.line, rec.skip_reason, rec.detail)
                    batch.append(_Item(split, fi, rec.line, example=example))
                    continue
                offset = s0[2] if (fi, rec.line) == (s0[0], s0[1]) else 0
                batch.append(_Item(split, fi, rec.line, rec.text, rec.set_name, offset))
                batch_bytes += len(rec.text)
                if len(batch) >= docs_per_batch or batch_bytes >= _BATCH_TEXT_BYTES:
                    submit(batch)
                    batch, batch_bytes = [], 0
        if batch:
            submit(batch)
        while pending:
            its, res = pending.popleft()
            handle(its, res.get())
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
