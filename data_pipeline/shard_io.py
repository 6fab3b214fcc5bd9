"""Token shards on disk: webdataset tar files of zstd-compressed fixed windows.

A sample is one window of `seq_len + 1` token ids stored as `<key>.u16.zst` or `<key>.u32.zst`
(the extension carries the dtype, as the raw bytes carry none). Keys are
`<shard stem>-<index in shard>` so a reader can tell exactly which samples a damaged shard
lost. Tar members are written by hand with fixed metadata (mtime 0, root owner), so the same
input always gives byte-identical shards: a resumed prepare reproduces the checksums.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zstandard

from .errors import ShardFetchError

__all__ = [
    "ShardInfo",
    "ShardWriter",
    "CorruptSample",
    "sample_extension",
    "decode_sample",
    "iter_shard_members",
    "member_offsets",
    "member_data",
    "ShardMember",
    "dtype_for_vocab",
]


@dataclass(slots=True)
class ShardInfo:
    """One finished shard as the manifest lists it."""

    name: str
    samples: int
    bytes: int
    sha256: str


class CorruptSample(Exception):
    """A sample whose bytes do not decode to a window of the expected length."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2, NeoX, byte), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sample_extension(dtype: np.dtype) -> str:
    return {np.dtype(np.uint16): "u16.zst", np.dtype(np.uint32): "u32.zst"}[np.dtype(dtype)]


def decode_sample(data: bytes, dtype: np.dtype, window: int, dctx: zstandard.ZstdDecompressor) -> np.ndarray:
    """Token ids of one stored window; CorruptSample if zstd fails or the length is wrong."""
    try:
        raw = dctx.decompress(data)
    except zstandard.ZstdError as e:
        raise CorruptSample(f"zstd: {e}") from None
    arr = np.frombuffer(raw, dtype=dtype)
    if arr.size != window or len(raw) != window * np.dtype(dtype).itemsize:
        raise CorruptSample(f"{len(raw)} bytes, expected {window} tokens of {np.dtype(dtype).name}")
    return arr


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file (mode 644, mtime 0, owner 0:0).

    Own writer, not tarfile/webdataset.TarWriter: `TarInfo.tobuf` alone costs ~3x compressing the window.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    head = b"".join((
        raw.ljust(100, b"\0"), b"0000644\0", b"0000000\0", b"0000000\0",
        b"%011o\0" % size, b"00000000000\0",
    ))
    tail = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * (64 + 16 + 167)  # uname/gname, dev numbers, prefix
    checksum = sum(head) + sum(tail) + 8 * 0x20  # the checksum field counts as eight spaces
    return head + b"%06o\0 " % checksum + tail


class ShardWriter:
    """Writes one shard under `<name>.tmp` and renames it to `<name>` only when complete.

    A reader (or a resumed prepare) therefore never sees a half-written shard under its final name.
    """

    def __init__(self, folder: Path, name: str, dtype: np.dtype, level: int = 3) -> None:
        self.folder = Path(folder)
        self.name = name
        self.stem = name.removesuffix(".tar")
        self.ext = sample_extension(dtype)
        self.dtype = np.dtype(dtype)
        self._tmp = self.folder / (name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        # The 4-byte content checksum lets readers tell a damaged sample from a valid one.
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self.samples = 0
        self.bytes = 0

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._sha.update(b)
        self.bytes += len(b)

    def add(self, window: np.ndarray) -> None:
        """Append one window (already of the shard's dtype and length)."""
        data = self._cctx.compress(np.ascontiguousarray(window, dtype=self.dtype).tobytes())
        self._write(ustar_header(f"{self.stem}-{self.samples:08d}.{self.ext}", len(data)))
        self._write(data)
        if len(data) % 512:
            self._write(b"\0" * (512 - len(data) % 512))
        self.samples += 1

    def close(self) -> ShardInfo:
        """Finish the archive, fsync, and move it to its final name."""
        self._write(b"\0" * 1024)  # tar end-of-archive marker
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.folder / self.name)
        return ShardInfo(self.name, self.samples, self.bytes, self._sha.hexdigest())

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def sample_index(member_name: str) -> int | None:
    """Index within its shard of a member named `<stem>-<index>.<ext>`, or None if not ours."""
    base = member_name.split(".", 1)[0]
    _, _, idx = base.rpartition("-")
    return int(idx) if idx.isdigit() else None


def member_offsets(f: io.BufferedIOBase) -> list[int]:
    """Header offsets of the members a shard holds, sample index i at entry i, then the end of the
    last member's data: n + 1 entries for n members, so member i spans [out[i], out[i + 1]).
    Reads only headers (seeking past the data when `f` can seek).

    Stops at anything but a plain USTAR regular file named `<stem>-<i>` in order, as
    `ShardWriter` writes them, and at a member cut short: what follows is not indexed.
    """
    out: list[int] = []
    at = 0
    seekable = getattr(f, "seekable", lambda: False)()
    total = None
    if seekable:
        total = f.seek(0, os.SEEK_END)
        f.seek(0)
    while True:
        head = f.read(tarfile.BLOCKSIZE)
        if len(head) < tarfile.BLOCKSIZE or head[156:157] not in (b"0", b"\0") or head[257:262] != b"ustar":
            break
        if sample_index(head[:100].rstrip(b"\0").decode("utf-8", "replace")) != len(out):
            break
        try:
            size = int(head[124:136].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            break
        padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if total is not None:
            if at + tarfile.BLOCKSIZE + size > total:
                break
            f.seek(at + tarfile.BLOCKSIZE + padded)
        else:
            rest = padded
            while rest:
                chunk = f.read(min(rest, 1 << 20))
                if not chunk:
                    return out + [at] if out else []
                rest -= len(chunk)
        out.append(at)
        at += tarfile.BLOCKSIZE + padded
    return out + [at] if out else []


def member_data(buf: bytes, index: int, ext: str) -> bytes:
    """The data of member `index` from its bytes [header offset, next header offset) of a shard.

    Raises:
        CorruptSample: the bytes are not a USTAR header of `<stem>-<index>.<ext>` followed by its data.
    """
    if len(buf) < tarfile.BLOCKSIZE:
        raise CorruptSample(f"sample {index} is missing (shard ended early)")
    head = buf[:tarfile.BLOCKSIZE]
    if head[257:262] != b"ustar" or head[156:157] not in (b"0", b"\0"):
        raise CorruptSample(f"sample {index}: no tar member header where the index says")
    name = head[:100].rstrip(b"\0").decode("utf-8", "replace")
    if sample_index(name) != index:
        raise CorruptSample(f"sample {index}: member {name} where the index says sample {index}")
    if not name.endswith("." + ext):
        raise CorruptSample(f"sample {index}: {name} is not a .{ext} member")
    try:
        size = int(head[124:136].rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        raise CorruptSample(f"sample {index}: unreadable tar header") from None
    data = buf[tarfile.BLOCKSIZE:tarfile.BLOCKSIZE + size]
    if len(data) < size:
        raise CorruptSample(f"sample {index} is cut short (shard ended early)")
    return bytes(data)


class ShardMember(NamedTuple):
    index: int | None
    """Sample index from the member name (`sample_index`), None if the name is not ours."""
    name: str
    data: bytes
    next_offset: int
    """Byte offset in the shard of the next member's header (`verify` compares them with the sample index)."""


def iter_shard_members(stream: io.BufferedIOBase, url: str) -> Iterator[ShardMember]:
    """The regular-file members of a shard tar, read from `stream` at the shard's start.

    tarfile's stream mode, as webdataset's tar iterator uses it, plus the offsets that iterator hides.
    I/O failures become `ShardFetchError` (never skipped: samples must not vanish silently);
    what the tar reader raises about the bytes themselves means damaged content: CorruptSample.
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            if not info.isreg():
                continue
            data = tar.extractfile(info).read()
            tar.members = []  # stream mode keeps every TarInfo otherwise
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            yield ShardMember(sample_index(info.name), info.name, data, end)
    except ShardFetchError:
        raise
    except OSError as e:
        # I/O failed below the tar layer (a pipe command failed, a disk error): not bad content.
        raise ShardFetchError(f"{url}: read failed: {e}") from None
    except (tarfile.TarError, EOFError, ValueError, zstandard.ZstdError) as e:
        raise CorruptSample(f"{url}: unreadable tar: {e}") from None
