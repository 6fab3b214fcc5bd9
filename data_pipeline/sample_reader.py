"""Reading one sample by position: a positioned read of its tar member, decoded, or a replacement.

Sample i of a shard is bytes [offset[i], offset[i+1]) of it (`sample_index`): one `os.pread` on
a local file (a few descriptors kept open), one HTTP Range request on a URL (several in flight per
reader: `read_ahead`, each resumed on a dropped connection and retried as `remote` does).

A sample that does not decode (bad header, bad zstd, wrong length, a shard cut short) is replaced
by the next readable sample of its shard (up to `_REPLACEMENT_TRIES` later ones, else a window of
EOS tokens) and reported with its origin; with `strict` it raises CorruptShardError. The
replacement depends only on the sample's position, so every data-parallel size and worker count
hands over the same rows. Fetch failures (a connection lost beyond its retries) always raise.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zstandard

from .errors import CorruptShardError, ManifestError, ShardFetchError
from .manifest import SplitInfo
from .remote import is_url, join_url, read_range
from .sample_index import ShardOffsets, load_index
from .shard_io import CorruptSample, decode_sample, member_data, sample_extension

__all__ = ["Source", "ReadSettings", "SampleReader", "Origin", "Location"]

logger = logging.getLogger(__name__)

Origin = tuple[str, str]
"""(shard URL, reason) of a sample that could not be read and was replaced."""
Location = tuple[int, int, int]
"""(source, shard, index in shard)."""

_MAX_OPEN_FILES = 64
_REPLACEMENT_TRIES = 4
_MAX_CORRUPT_WARNINGS = 20


@dataclass(frozen=True)
class Source:
    """What a reader needs of one prepared folder's split; small and picklable (for DataLoader workers)."""

    folder: str
    split: str
    info: SplitInfo

    @property
    def remote(self) -> bool:
        return is_url(self.folder) and not self.folder.startswith("file:")


@dataclass(frozen=True)
class ReadSettings:
    dtype: str
    window: int
    eos_id: int
    strict: bool
    retries: int
    timeout_s: float
    read_ahead: int
    """Range requests in flight per reader (remote folders)."""


class SampleReader:
    """Samples by location, for one process (the training process or one DataLoader worker)."""

    def __init__(self, sources: tuple[Source, ...], settings: ReadSettings,
                 offsets: list[ShardOffsets] | None = None) -> None:
        self.sources = sources
        self.s = settings
        self._offsets: list[ShardOffsets | None] = list(offsets) if offsets else [None] * len(sources)
        self._files: OrderedDict[str, int] = OrderedDict()
        self._dctx = zstandard.ZstdDecompressor()
        self._ext = sample_extension(np.dtype(settings.dtype))
        self._warned = 0

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def read(self, locations: Iterable[Location]) -> Iterator[tuple[np.ndarray, Origin | None]]:
        """(row, origin if it is a replacement) of each location, in order."""
        self._load_offsets()
        if not any(src.remote for src in self.sources):
            for loc in locations:
                yield self._decoded(loc, self._fetch(loc))
            return
        with ThreadPoolExecutor(self.s.read_ahead, thread_name_prefix="hippo-read") as pool:
            pending: deque = deque()
            for loc in locations:
                pending.append((loc, pool.submit(self._fetch, loc)))
                if len(pending) > self.s.read_ahead:
                    first, fut = pending.popleft()
                    yield self._decoded(first, fut.result())
            while pending:
                first, fut = pending.popleft()
                yield self._decoded(first, fut.result())

    # ------------------------------------------------------------------ one sample

    def _url(self, src: int, shard: int) -> str:
        source = self.sources[src]
        return join_url(source.folder, source.info.shards[shard].name)

    def _load_offsets(self) -> None:
        """Each source's index, where this process has none yet (a DataLoader worker: its own view;
        the rank checked the files)."""
        for i, source in enumerate(self.sources):
            if self._offsets[i] is None:
                self._offsets[i] = load_index(source.folder, source.split, source.info, check=False)

    def _span(self, src: int, shard: int, index: int) -> tuple[int, int]:
        return self._offsets[src].span(shard, index)

    def _fetch(self, loc: Location) -> bytes:
        """The bytes of the location's tar member: one positioned read (fewer where the shard ends early)."""
        src, shard, index = loc
        start, stop = self._span(src, shard, index)
        url = self._url(src, shard)
        if self.sources[src].remote:
            return read_range(url, start, stop, retries=self.s.retries, timeout=self.s.timeout_s)
        try:
            return os.pread(self._fd(url.removeprefix("file://")), stop - start, start)
        except OSError as e:
            raise ShardFetchError(f"{url}: read failed: {e}") from None

    def _fd(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is not None:
            self._files.move_to_end(path)
            return fd
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise ManifestError(f"{path}: shard listed in the manifest is missing ({e})") from None
        self._files[path] = fd
        if len(self._files) > _MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def _decode(self, loc: Location, data: bytes) -> np.ndarray:
        return decode_sample(member_data(data, loc[2], self._ext), np.dtype(self.s.dtype), self.s.window, self._dctx)

    def _decoded(self, loc: Location, data: bytes) -> tuple[np.ndarray, Origin | None]:
        try:
            return self._decode(loc, data), None
        except CorruptSample as e:
            reason = f"{self._url(loc[0], loc[1])}: {e}"
        if self.s.strict:
            raise CorruptShardError(f"{reason} (data.strict is set)")
        self._warned += 1
        if self._warned <= _MAX_CORRUPT_WARNINGS:
            logger.warning("replacing an unreadable sample: %s", reason)
        return self._replacement(loc), (self._url(loc[0], loc[1]), reason)

    def _replacement(self, loc: Location) -> np.ndarray:
        """The next readable sample of the same shard, else a window of EOS tokens."""
        src, shard, index = loc
        n = self.sources[src].info.shards[shard].samples
        for k in range(1, min(_REPLACEMENT_TRIES, n - 1) + 1):
            other = (src, shard, (index + k) % n)
            try:
                return self._decode(other, self._fetch(other))
            except CorruptSample:
                continue
        return np.full(self.s.window, self.s.eos_id, dtype=self.s.dtype)
