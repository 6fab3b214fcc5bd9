"""Exceptions of the data pipeline; each message names the file, line, shard or option at fault."""

from __future__ import annotations

__all__ = [
    "DataExhaustedError",
    "BadRecordError",
    "CorruptShardError",
    "ShardFetchError",
    "ManifestError",
]


class DataExhaustedError(Exception):
    """The stream has no more data (e.g. `max_epochs` reached).

    An `Exception`, not `StopIteration`: PEP 479 turns a StopIteration escaping a generator
    into a RuntimeError, and a training loop must be able to tell "out of data" from "done".
    """


class BadRecordError(ValueError):
    """A malformed input record in `--strict` mode; the message names file and line."""


class CorruptShardError(RuntimeError):
    """A shard's content is unreadable (bad tar member, bad zstd) in strict mode."""


class ShardFetchError(OSError):
    """A shard or manifest could not be fetched completely, even after retries.

    Never downgraded to a warning: a dropped connection must not silently lose samples.
    """


class ManifestError(ValueError):
    """A prepared folder's manifest is missing, unreadable or does not match the request."""
