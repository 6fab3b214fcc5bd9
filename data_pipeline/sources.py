"""Reading input documents: `.jsonl`, `.jsonl.zst`, `.txt` (and `.txt.zst`).

Every input line becomes a `Record`, good or bad, so that bad input is counted per reason and
reported with file and line instead of stopping a multi-hour run (unless `--strict`).
A `.txt` file is one document. A corrupt or truncated zstd stream cannot be resynchronised:
the rest of that file is skipped and counted once, at the line where it broke. Text is decoded
with `encoding` (default UTF-8); `errors="strict"` skips (and counts) a record or `.txt` file
that does not decode, `"replace"` keeps it with U+FFFD for the bad bytes.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

__all__ = ["Record", "SKIP_REASONS", "iter_records", "iter_texts", "input_kind", "check_encoding",
           "SUPPORTED_SUFFIXES", "DECODE_ERRORS"]

SKIP_REASONS = (
    "malformed_json",
    "missing_text",
    "empty_text",
    "invalid_utf8",
    "invalid_encoding",
    "corrupt_zstd",
    "truncated_zstd",
)
SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.zst", ".json.zst", ".txt", ".txt.zst")
DECODE_ERRORS = ("strict", "replace")

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Record:
    """One input record: a document, or the reason it was skipped."""

    line: int
    """1-based line in the (decompressed) file; where the stream broke for zstd errors."""
    text: str | None
    set_name: str | None = None
    """`meta.pile_set_name`, kept so the manifest can count tokens per Pile subset."""
    skip_reason: str | None = None
    detail: str = ""


def input_kind(path: str | Path) -> tuple[str, bool]:
    """("jsonl" | "txt", zstd-compressed?) from the file name; ValueError for anything else."""
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return ("txt" if suffix.startswith(".txt") else "jsonl"), suffix.endswith(".zst")
    raise ValueError(f"{path}: unsupported input type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")


class _ZstdBroken(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.line = 1


def _zstd_chunks(f) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd file; raises _ZstdBroken on corruption or truncation.

    `stream_reader` returns a silently short result for a truncated file, so frames are driven
    by hand and a frame that never reaches its end is reported.
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
    dobj = dctx.decompressobj()
    in_frame = False
    while True:
        data = f.read(_CHUNK)
        if not data:
            break
        while data:
            try:
                out = dobj.decompress(data)
            except zstandard.ZstdError as e:
                raise _ZstdBroken("corrupt_zstd", str(e)) from None
            in_frame = True
            if out:
                yield out
            if dobj.eof:
                data = dobj.unused_data
                dobj = dctx.decompressobj()
                in_frame = False
            else:
                data = b""
    if in_frame:
        raise _ZstdBroken("truncated_zstd", "stream ends inside a zstd frame")


def _lines(path: Path, compressed: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, line bytes without newline); _ZstdBroken carries the line where it broke."""
    with open(path, "rb") as f:
        if not compressed:
            for n, line in enumerate(f, 1):
                yield n, line.rstrip(b"\r\n")
            return
        n, pending = 0, b""
        held: list[bytes] = []  # chunks of one long line, joined once (not re-copied per chunk)
        try:
            for chunk in _zstd_chunks(f):
                if b"\n" not in chunk:
                    held.append(chunk)
                    continue
                if held:
                    pending, held = pending + b"".join(held), []
                parts = (pending + chunk).split(b"\n")
                pending = parts.pop()
                for line in parts:
                    n += 1
                    yield n, line.rstrip(b"\r")
            if held:
                pending += b"".join(held)
        except _ZstdBroken as e:
            e.detail = f"{e.detail}; rest of file skipped"
            e.line = n + 1
            raise
        if pending:
            yield n + 1, pending.rstrip(b"\r")


def check_encoding(encoding: str, errors: str, *, lines: bool) -> str:
    """The codec's canonical name; ValueError naming --encoding / --errors for ones we cannot use.

    jsonl is split into lines at byte 0x0A before decoding, so it needs an ASCII-compatible codec.
    """
    try:
        name = codecs.lookup(encoding).name
        newline = "\n{}".encode(name)
    except (LookupError, UnicodeError):
        raise ValueError(f"--encoding {encoding}: not a text encoding (examples: utf-8, latin-1, cp1252)") from None
    if errors not in DECODE_ERRORS:
        raise ValueError(f"--errors {errors}: must be one of {', '.join(DECODE_ERRORS)}")
    if lines and newline != b"\n{}":
        raise ValueError(f"--encoding {encoding}: jsonl lines are split at byte 0x0A, which {name} does not use; "
                         "convert the file to UTF-8 (or use .txt inputs)")
    return name


def _decode(data: bytes, n: int, encoding: str, errors: str) -> str | Record:
    """The text, or the skipped Record (with the line of the first bad byte) if it does not decode."""
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError as e:
        reason = "invalid_utf8" if codecs.lookup(encoding).name == "utf-8" else "invalid_encoding"
        line = n + data.count(b"\n", 0, e.start)
        return Record(line, None, skip_reason=reason,
                      detail=f"byte {e.start}: {e.reason} ({encoding}; --errors replace keeps it as U+FFFD)")


def _parse_json_line(line: bytes, n: int, encoding: str = "utf-8", errors: str = "strict") -> Record:
    s = _decode(line, n, encoding, errors)
    if isinstance(s, Record):
        return s
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return Record(n, None, skip_reason="malformed_json", detail=f"column {e.colno}: {e.msg}")
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return Record(n, None, skip_reason="missing_text", detail="no string field 'text'")
    text = obj["text"]
    if not text:
        return Record(n, None, skip_reason="empty_text", detail="'text' is empty")
    if "\\ud" in s or "\\uD" in s:
        # JSON escapes can smuggle in lone surrogates, which no tokenizer can encode.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return Record(n, None, skip_reason="invalid_utf8", detail=f"lone surrogate at character {e.start}")
    meta = obj.get("meta")
    set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return Record(n, text, set_name=set_name if isinstance(set_name, str) else None)


def iter_records(path: str | Path, *, start_line: int = 1, encoding: str = "utf-8",
                 errors: str = "strict") -> Iterator[Record]:
    """Every record of one input file from `start_line` on, in file order.

    Blank jsonl lines are not records. Lines before `start_line` are only counted, not parsed
    (a resumed prepare skips what finished shards already hold). `encoding` and `errors` are
    as for `bytes.decode` (errors: strict or replace); see `check_encoding`.
    """
    path = Path(path)
    kind, compressed = input_kind(path)
    if kind == "txt":
        if start_line <= 1:
            yield _txt_record(path, compressed, encoding, errors)
        return
    try:
        for n, line in _lines(path, compressed):
            if n >= start_line and line.strip():
                yield _parse_json_line(line, n, encoding, errors)
    except _ZstdBroken as e:
        yield Record(e.line, None, skip_reason=e.reason, detail=e.detail)


def iter_texts(paths: list[Path], max_docs: int | None = None) -> Iterator[str]:
    """The good documents of several files, in order (bad records are skipped silently)."""
    n = 0
    for path in paths:
        for rec in iter_records(path):
            if rec.text is None:
                continue
            yield rec.text
            n += 1
            if max_docs is not None and n >= max_docs:
                return


def _txt_record(path: Path, compressed: bool, encoding: str = "utf-8", errors: str = "strict") -> Record:
    try:
        if compressed:
            with open(path, "rb") as f:
                data = b"".join(_zstd_chunks(f))
        else:
            data = path.read_bytes()
    except _ZstdBroken as e:
        return Record(1, None, skip_reason=e.reason, detail=e.detail)
    text = _decode(data, 1, encoding, errors)
    if isinstance(text, Record):
        return text
    if not text:
        return Record(1, None, skip_reason="empty_text", detail="file is empty")
    return Record(1, text, set_name=None)
