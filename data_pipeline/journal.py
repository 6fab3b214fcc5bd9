"""The resume journal of a prepare run: which shards are finished, and where each split resumes.

Line 1 holds the run's fingerprint (inputs with size and mtime, tokenizer hash, options); each
further line one finished shard: {"split", "shard", "position", "stats"}. Lines are appended and
fsynced after the shard's rename, so every listed shard exists under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .tokenizer import Tokenizer

__all__ = ["JOURNAL_NAME", "Journal", "fingerprint", "read_journal", "explain_mismatch", "valid_prefix"]

JOURNAL_NAME = "prepare.journal.jsonl"


_HASH_LIMIT = 256 << 20


def _file_identity(p: Path) -> str:
    """Content hash for files up to 256 MiB (a rewritten but identical corpus still matches),
    size and mtime beyond (hashing 825 GiB of Pile would take longer than resuming saves)."""
    st = p.stat()
    if st.st_size > _HASH_LIMIT:
        return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256=" + h.hexdigest()


def fingerprint(inputs: list[Path], val_inputs: set[Path], tok: Tokenizer, args: dict) -> dict:
    """What must not change between an interrupted run and its resumption."""
    files = [[str(p.resolve()), _file_identity(p), p.resolve() in val_inputs] for p in inputs]
    return {"inputs": files, "tokenizer": tok.identity_hash, "eos_id": tok.eos_id, **args}


def explain_mismatch(old: dict, new: dict) -> str:
    """The fingerprint keys that differ, for an error message."""
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(diffs) or "unknown"


def read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    """(fingerprint, finished-shard entries); (None, []) when there is no journal."""
    if not path.exists():
        return None, []
    header, entries = None, []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by the interruption: everything after it is unknown
            if i == 0:
                header = obj.get("fingerprint")
            else:
                entries.append(obj)
    return header, entries


def valid_prefix(folder: Path, entries: list[dict]) -> list[dict]:
    """Entries whose shard is still there with the recorded size; per split, up to the first that is not."""
    kept, broken = [], set()
    for e in entries:
        s = e["split"]
        p = folder / e["shard"]["name"]
        if s in broken or not p.exists() or p.stat().st_size != e["shard"]["bytes"]:
            broken.add(s)
            continue
        kept.append(e)
    return kept


class Journal:
    """Append-only, fsynced log of finished shards."""

    def __init__(self, path: Path, fingerprint: dict, entries: list[dict]) -> None:
        self.path = path
        # Rewritten from the entries kept, so a cut-off last line never sits in the middle.
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            for e in entries:
                f.write(json.dumps(e) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._f = open(path, "a", encoding="utf-8")

    def append(self, entry: dict) -> None:
        self._f.write(json.dumps(entry) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
