"""Where each sample of a split starts: `<split>.index` beside the shards, listed in the manifest.

A reader fetches sample i of a shard with one positioned read of bytes [offset[i], offset[i+1]):
its tar header and data (`shard_io.member_data`). The file holds little-endian uint64 offsets,
per shard in manifest order its n + 1 `shard_io.member_offsets` (the last: the end of the last
member). `hippo data prepare` writes it after the shards; `hippo data index DIR` adds it to a
folder prepared before (once, with a progress bar). The manifest records its size and sha256,
so a damaged or stale index is refused as a damaged shard would be, never trusted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ManifestError
from .manifest import MANIFEST_NAME, Manifest, SplitInfo, load_manifest, write_json_atomic
from .remote import is_url, join_url, read_bytes
from .shard_io import member_offsets

__all__ = ["ShardOffsets", "index_name", "build_split_index", "index_folder", "load_index"]

_DTYPE = np.dtype("<u8")


def index_name(split: str) -> str:
    return f"{split}.index"


@dataclass(frozen=True)
class ShardOffsets:
    """A split's member offsets: member i of shard s spans bytes [start, stop) of that shard."""

    offsets: np.ndarray
    bases: np.ndarray
    """Position in `offsets` of each shard's first entry."""

    def span(self, shard: int, i: int) -> tuple[int, int]:
        b = int(self.bases[shard]) + i
        return int(self.offsets[b]), int(self.offsets[b + 1])


def _bases(split: SplitInfo) -> np.ndarray:
    counts = np.array([sh.samples + 1 for sh in split.shards], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


def build_split_index(folder: Path, split_name: str, split: SplitInfo, *, progress: bool = False) -> dict:
    """Write `<split>.index` for a local folder's split from its shards' headers; its manifest entry.

    Raises:
        ManifestError: a shard holds fewer readable members than the manifest lists (run verify).
    """
    from tqdm import tqdm

    path = Path(folder) / index_name(split_name)
    tmp = path.with_name(path.name + ".tmp")
    sha, size = hashlib.sha256(), 0
    with open(tmp, "wb") as out:
        for sh in tqdm(split.shards, desc=f"index {split_name}", unit="shard", disable=not progress):
            with open(Path(folder) / sh.name, "rb") as f:
                offsets = member_offsets(f)
            if len(offsets) != sh.samples + 1:
                tmp.unlink()
                raise ManifestError(
                    f"{Path(folder) / sh.name}: {max(0, len(offsets) - 1)} readable samples, the manifest lists "
                    f"{sh.samples}; run `hippo data verify {folder}` and re-run `hippo data prepare` for it")
            data = np.asarray(offsets, dtype=_DTYPE).tobytes()
            out.write(data)
            sha.update(data)
            size += len(data)
    tmp.replace(path)
    return {"name": path.name, "bytes": size, "sha256": sha.hexdigest()}


def index_folder(folder: str | Path, *, progress: bool = False) -> Manifest:
    """`hippo data index DIR`: (re)build every split's index of a local folder and record it in the manifest."""
    if is_url(str(folder)):
        raise ValueError(f"{folder}: `hippo data index` works on a local folder; index the folder where it was "
                         "prepared, then upload its *.index files and manifest.json")
    folder = Path(folder)
    m = load_manifest(str(folder))
    for name, split in m.splits.items():
        split.index = build_split_index(folder, name, split, progress=progress) if split.shards else None
    write_json_atomic(folder / MANIFEST_NAME, m.to_dict())
    return m


def _missing(folder: str, split_name: str) -> ManifestError:
    return ManifestError(f"{folder}: no sample index for split {split_name!r} (prepared before Hippo had one); "
                         f"run `hippo data index {folder}` once")


def _index_bytes(folder: str, split_name: str, split: SplitInfo) -> bytes:
    if split.index is None:
        raise _missing(folder, split_name)
    url = join_url(folder, split.index["name"])
    try:
        return read_bytes(url, expected_size=split.index["bytes"])
    except FileNotFoundError:
        raise ManifestError(f"{url}: the sample index listed in the manifest is missing; "
                            f"run `hippo data index {folder}`") from None


def _problem(folder: str, split: SplitInfo, size: int, sha256: str) -> str | None:
    """What is wrong with a split's index file of `size` bytes and digest `sha256`, or None."""
    info = split.index
    where = join_url(folder, info["name"])
    if size != info["bytes"]:
        return f"{where}: {size} bytes, manifest says {info['bytes']}"
    if sha256 != info["sha256"]:
        return f"{where}: sha256 differs from the manifest (damaged)"
    if size != int(_bases(split)[-1]) * _DTYPE.itemsize:
        return f"{where}: does not list the manifest's {len(split.shards)} shards"
    return None


def _local_file_digest(path: Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def load_index(folder: str, split_name: str, split: SplitInfo, *, check: bool = True) -> ShardOffsets:
    """The offsets of a split: a local index file mapped (no private memory: DataLoader workers
    share the page cache), a remote one read once; checked against the manifest unless `check`
    is False (a DataLoader worker of a rank that checked it; a stale entry still cannot be misread,
    `shard_io.member_data` checks each member's name).

    Raises:
        ManifestError naming the file and `hippo data index` when it is missing or damaged.
    """
    if split.index is None:
        raise _missing(folder, split_name)
    url = join_url(folder, split.index["name"])
    if is_url(folder) and not folder.startswith("file:"):
        data = _index_bytes(folder, split_name, split)
        problem = check and _problem(folder, split, len(data), hashlib.sha256(data).hexdigest())
        offsets = np.frombuffer(data, dtype=_DTYPE)
    else:
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise ManifestError(f"{url}: the sample index listed in the manifest is missing; "
                                f"run `hippo data index {folder}`")
        problem = check and _problem(folder, split, *_local_file_digest(path))
        offsets = np.memmap(path, dtype=_DTYPE, mode="r") if path.stat().st_size else np.zeros(0, _DTYPE)
    if problem:
        raise ManifestError(f"{problem}; rebuild it with `hippo data index {folder}`")
    return ShardOffsets(offsets, _bases(split))
