"""Opening shards and manifests by path or URL, with retries that never lose bytes silently.

Local paths and `file://` are plain files; `http(s)://` goes through `ResumableHTTPReader`,
which re-requests the rest of the object (HTTP Range) when the server drops the connection
and fails with `ShardFetchError` once retries are used up; every other scheme webdataset knows
(`pipe:`, `gs:`, ...) goes to `webdataset.gopen`. webdataset's own http handler runs `curl`,
which cannot resume mid-object and reports a dropped connection only as a truncated tar.
"""

from __future__ import annotations

import http.client
import io
import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from .errors import ShardFetchError

__all__ = ["is_url", "join_url", "open_url", "read_bytes", "read_range", "ResumableHTTPReader"]

logger = logging.getLogger(__name__)

_NET_ERRORS = (
    ConnectionError,
    http.client.HTTPException,
    socket.timeout,
    TimeoutError,
    urllib.error.URLError,
    OSError,
)


def is_url(s: str) -> bool:
    """True for `scheme://...` and `pipe:...` (not for Windows-style or plain local paths)."""
    return "://" in s or s.startswith("pipe:")


def join_url(prefix: str, name: str) -> str:
    """`prefix/name` for both folders and URL prefixes."""
    if is_url(prefix):
        return prefix.rstrip("/") + "/" + name
    return str(Path(prefix) / name)


# Own reader, not webdataset's http gopen (`curl`) or bare urllib: neither resumes a dropped body by Range.
class ResumableHTTPReader(io.RawIOBase):
    """A read-only HTTP body that survives dropped connections.

    Args:
        url: http(s) URL.
        expected_size: bytes the object must have (from the manifest); a shorter body is a
            transfer error, never a clean end of file.
        retries: reconnections allowed without progress before giving up.
        timeout: socket timeout in seconds, so a stalled server cannot hang training.
        offset: first byte to read (a Range request).
        stop: with `offset`, read bytes [offset, stop) only (`bytes=offset-(stop-1)`), as a
            sample of a shard is read; None reads to the end of the object.
    """

    def __init__(self, url: str, *, expected_size: int | None = None, retries: int = 5,
                 timeout: float = 60.0, backoff: float = 0.2, offset: int = 0, stop: int | None = None) -> None:
        super().__init__()
        self.url = url
        self.expected_size = expected_size
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.offset = offset
        self.stop = stop
        self.reconnects = 0
        self._resp: http.client.HTTPResponse | None = None
        self._total: int | None = stop if stop is not None else expected_size
        self._connect_with_retries()

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
        if self.stop is not None:
            headers = {"Range": f"bytes={self.offset}-{self.stop - 1}"}
        else:
            headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        try:
            resp = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and self._total is not None and self.offset >= self._total:
                self._resp = None
                return
            if 400 <= e.code < 500:
                # A missing or forbidden object will not appear by retrying.
                raise ShardFetchError(f"{self.url}: HTTP {e.code} {e.reason}") from None
            raise
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            start = int(resp.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
            if start != self.offset:
                resp.close()
                raise ShardFetchError(f"{self.url}: asked for byte {self.offset}, server resumed at {start}")
        else:
            # No range support: the server sends the whole object again; drop what we already have.
            if length is not None and self._total is None:
                self._total = int(length)
            to_skip = self.offset
            while to_skip:
                chunk = resp.read(min(to_skip, 1 << 20))
                if not chunk:
                    resp.close()
                    raise http.client.IncompleteRead(b"")
                to_skip -= len(chunk)
        if self._total is None and length is not None and resp.status == 206:
            self._total = self.offset + int(length)
        self._resp = resp

    def _connect_with_retries(self) -> None:
        for attempt in range(self.retries + 1):
            try:
                self._connect()
                return
            except ShardFetchError:
                raise
            except _NET_ERRORS as e:
                last = e
                time.sleep(self.backoff * (2**attempt))
        raise ShardFetchError(f"{self.url}: cannot connect after {self.retries} retries: {last}")

    def readinto(self, buf) -> int:
        if self.stop is not None:  # a server without Range support sends the rest of the object
            buf = memoryview(buf)[:max(0, self.stop - self.offset)]
            if not len(buf):
                return 0
        failures, err = 0, None
        while True:
            if self._resp is not None:
                try:
                    n = self._resp.readinto(buf)
                    err = None
                except _NET_ERRORS as e:
                    n, err = 0, e
                if n:
                    self.offset += n
                    return n
                if err is None and (self._total is None or self.offset >= self._total):
                    return 0  # a clean end of the object
                # Dropped: an error, or the body ended before the known size. Resume from offset.
                self._resp.close()
                self._resp = None
            elif self._total is not None and self.offset >= self._total:
                return 0  # the server answered 416: nothing left to read
            failures += 1
            if failures > self.retries:
                raise ShardFetchError(
                    f"{self.url}: connection lost at byte {self.offset} of {self._total} "
                    f"after {self.retries} retries ({err or 'body ended early'})"
                )
            self.reconnects += 1
            logger.warning("%s: connection lost at byte %d (%s); resuming (retry %d/%d)",
                           self.url, self.offset, err or "body ended early", failures, self.retries)
            if failures > 1:  # reconnect at once after a drop; back off if that fails too
                time.sleep(self.backoff * (2 ** (failures - 2)))
            try:
                self._connect()
            except ShardFetchError:
                raise
            except _NET_ERRORS as e:
                err = e  # no response: the next round counts another failure

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()


def open_url(url: str, *, expected_size: int | None = None, retries: int = 5, timeout: float = 60.0,
             offset: int = 0) -> BinaryIO:
    """Open a local path or URL for binary reading (buffered), from byte `offset` on.

    Files seek and HTTP asks for a Range; a `pipe:` command can only be read through to the
    offset (training refuses `pipe:` folders: it reads samples by position, see `read_range`).
    """
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raw = ResumableHTTPReader(url, expected_size=expected_size, retries=retries, timeout=timeout, offset=offset)
        return io.BufferedReader(raw, buffer_size=1 << 20)
    if parsed.scheme == "file" or not is_url(url):
        f = open(urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else url, "rb")
        f.seek(offset)
        return f
    from webdataset.gopen import gopen as wds_gopen

    f = wds_gopen(url, "rb")
    to_skip = offset
    while to_skip:
        chunk = f.read(min(to_skip, 1 << 20))
        if not chunk:
            raise ShardFetchError(f"{url}: ended before byte {offset}")
        to_skip -= len(chunk)
    return f


def read_range(url: str, start: int, stop: int, *, retries: int = 5, timeout: float = 60.0) -> bytes:
    """Bytes [start, stop) of an http(s) object: one Range request, resumed where a dropped
    connection stopped (`ResumableHTTPReader`); fewer bytes only where the object ends first."""
    r = ResumableHTTPReader(url, offset=start, stop=stop, retries=retries, timeout=timeout)
    try:
        out = bytearray()
        while len(out) < stop - start and (chunk := r.read(stop - start - len(out))):
            out += chunk
        return bytes(out)
    finally:
        r.close()


def read_bytes(url: str, **kw) -> bytes:
    """The whole content of a small object (a manifest, a tokenizer.json)."""
    try:
        with open_url(url, **kw) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except ShardFetchError:
        raise
    except _NET_ERRORS as e:
        raise ShardFetchError(f"{url}: {e}") from e
