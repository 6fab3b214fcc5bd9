"""The embedded default corpus: the Python standard library's own source files.

Every machine with Python has them, so the quick start trains on real text with nothing to
download. The result depends on the Python patch version, which is recorded next to the
corpus (`<corpus>.source.json`) and copied by prepare into the manifest's source info.
"""

from __future__ import annotations

import json
import os
import platform
import sysconfig
from pathlib import Path

__all__ = ["write_default_corpus", "stdlib_files", "SET_NAME"]

SET_NAME = "python-stdlib"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib folder and its .py files in sorted (relative, POSIX) order, tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        files.append(p)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def write_default_corpus(path: Path, max_bytes: int) -> Path:
    """Write stdlib sources as a .jsonl of documents (one file each), up to `max_bytes` of output.

    Files that are not valid UTF-8 (or empty) are skipped; writing stops before the first
    document that would exceed `max_bytes`.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root, files = stdlib_files()
    tmp = path.with_name(path.name + ".tmp")
    written = docs = 0
    with open(tmp, "wb") as f:
        for p in files:
            try:
                text = p.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            rel = p.relative_to(root).as_posix()
            line = (json.dumps({"text": text, "meta": {"pile_set_name": SET_NAME, "path": rel}},
                               ensure_ascii=False) + "\n").encode("utf-8")
            if written + len(line) > max_bytes:
                break
            f.write(line)
            written += len(line)
            docs += 1
    os.replace(tmp, path)
    info = {
        "generator": "hippo default corpus (Python standard library sources)",
        "python_version": platform.python_version(),
        "stdlib": str(root),
        "documents": docs,
        "bytes": written,
    }
    path.with_name(path.name + ".source.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return path
