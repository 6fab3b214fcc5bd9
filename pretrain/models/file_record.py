"""Sizes and SHA-256 of a folder's files, recorded when the folder is written and checked before
it is trusted: training checkpoints (`hippo_checkpoint.json`) and model folders (`hippo_files.json`).
A same-size flip of bytes, a truncated file or a missing one is named, never loaded silently."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """What a record holds of one file."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def listing_problem(folder: Path, listing: dict[str, Any], *, part: int = 0, parts: int = 1) -> str | None:
    """The first listed file (relative to `folder`) that is missing, of another size, or, for files
    part, part + parts, ... of the sorted listing, of another SHA-256; None when all match. A bare
    int entry (records written before checksums existed) is a size only."""
    for i, (rel, recorded) in enumerate(sorted(listing.items())):
        size, digest = (recorded, None) if isinstance(recorded, int) else (recorded["bytes"], recorded["sha256"])
        f = folder / rel
        if not f.exists():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, its record says {size}"
        if digest is not None and i % parts == part and file_sha256(f) != digest:
            return f"{rel} does not match its SHA-256 (damaged after it was written)"
    return None
