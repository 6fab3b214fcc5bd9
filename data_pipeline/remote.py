"""Opening shards and manifests by path or URL, with retries that never lose bytes silently.

Local paths and `file://` are plain files; `http(s)://` goes through `ResumableHTTPReader`,
which re-requests the rest of the object (HTTP Range) when the server drops the connection
and fails with `ShardFetchError` once retries are used up; `read_range` reads one byte range (a
sample) the same way, on a kept-alive connection per thread. Every other scheme webdataset knows
(`pipe:`, `gs:`, ...) goes to `webdataset.gopen`. webdataset's own http handler runs `curl`,
which cannot resume mid-object and reports a dropped connection only as a truncated tar.
"""

from __future__ import annotations

import http.client
import io
import logging
import socket
import threading
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
    """

    def __init__(self, url: str, *, expected_size: int | None = None, retries: int = 5,
                 timeout: float = 60.0, backoff: float = 0.2, offset: int = 0) -> None:
        super().__init__()
        self.url = url
        self.expected_size = expected_size
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.offset = offset
        self.reconnects = 0
        self._resp: http.client.HTTPResponse | None = None
        self._total: int | None = expected_size
        self._connect_with_retries()

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
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


def open_url(url: str, *, expected_size: int | None = None, retries: int = 5, timeout: float = 60.0) -> BinaryIO:
    """Open a local path or URL for binary reading (buffered), from its start (whole objects:
    manifests, indexes, `verify`; training reads samples with `read_range` or `os.pread`)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raw = ResumableHTTPReader(url, expected_size=expected_size, retries=retries, timeout=timeout)
        return io.BufferedReader(raw, buffer_size=1 << 20)
    if parsed.scheme == "file" or not is_url(url):
        return open(urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else url, "rb")
    from webdataset.gopen import gopen as wds_gopen

    return wds_gopen(url, "rb")


_CONNECTIONS = threading.local()


def _connection(scheme: str, netloc: str, timeout: float) -> http.client.HTTPConnection:
    """This thread's kept-alive connection to a server (one request at a time on it)."""
    pool = _CONNECTIONS.__dict__.setdefault("pool", {})
    conn = pool.get((scheme, netloc))
    if conn is None:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = pool[scheme, netloc] = cls(netloc, timeout=timeout)
    return conn


def _drop_connection(scheme: str, netloc: str) -> None:
    conn = _CONNECTIONS.__dict__.get("pool", {}).pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


def read_range(url: str, start: int, stop: int, *, retries: int = 5, timeout: float = 60.0,
               backoff: float = 0.2) -> bytes:
    """Bytes [start, stop) of an http(s) object (fewer only where the object ends first).

    One Range request on a kept-alive connection per thread, as a sample of a shard is read. A
    dropped connection is retried from the byte it stopped at (`retries` times without progress,
    backing off after the first), a server without Range support is read from the start and cut;
    ShardFetchError once retries are used up, or at once for a 4xx answer.
    """
    parsed = urlparse(url)
    target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
    out = bytearray()
    failures, err = 0, None
    while len(out) < stop - start:
        at = start + len(out)
        try:
            conn = _connection(parsed.scheme, parsed.netloc, timeout)
            conn.request("GET", target, headers={"Range": f"bytes={at}-{stop - 1}"})
            resp = conn.getresponse()
            if resp.status == 416:
                resp.read()
                break  # the object ends before `at`
            if resp.status >= 400:
                resp.read()
                if resp.status < 500:  # a missing or forbidden object will not appear by retrying
                    raise ShardFetchError(f"{url}: HTTP {resp.status} {resp.reason}")
                raise http.client.HTTPException(f"HTTP {resp.status} {resp.reason}")
            skip = at if resp.status == 200 else 0  # 200: no Range support, the whole object again
            if resp.status == 206:
                first = int(resp.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
                if first != at:
                    resp.read()
                    raise ShardFetchError(f"{url}: asked for byte {at}, server answered from byte {first}")
            try:
                body, complete = resp.read(), True
            except http.client.IncompleteRead as e:
                body, complete, err = e.partial, False, e
            got = body[skip:skip + stop - at]
            out += got
            if complete and len(got) < stop - at:
                break  # a clean end of the object before `stop`
            if got:
                failures = 0
            if not complete:
                raise err
        except ShardFetchError:
            raise
        except _NET_ERRORS as e:
            err = e
            _drop_connection(parsed.scheme, parsed.netloc)
            failures += 1
            if failures > retries:
                raise ShardFetchError(f"{url}: connection lost at byte {start + len(out)} of [{start}, {stop}) "
                                      f"after {retries} retries ({err})") from None
            if failures > 1:
                time.sleep(backoff * (2 ** (failures - 2)))
    return bytes(out)


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
