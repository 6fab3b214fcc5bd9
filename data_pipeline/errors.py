"""Exceptions of the data pipeline; each message names the file, line, shard or option at fault."""

from __future__ import annotations

__all__ = [
    "DataExhaustedError",
    "BadRecordError",
    "CorruptShardError",
    "CorruptDataError",
    "EmptyDatasetError",
    "ShardFetchError",
    "ManifestError",
    "MissingSplitError",
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


class CorruptDataError(RuntimeError):
    """More samples were unreadable than `data.max_corrupt_fraction` allows.

    Replacing a rare damaged sample keeps a long run going; replacing many trains on copies
    and end-of-document padding, which is silent corruption, so the stream stops instead.
    """


class EmptyDatasetError(ValueError):
    """`prepare` read no usable document: empty inputs, or every record skipped."""


class ShardFetchError(OSError):
    """A shard or manifest could not be fetched completely, even after retries.

    Never downgraded to a warning: a dropped connection must not silently lose samples.
    """


class ManifestError(ValueError):
    """A prepared folder's manifest is missing, unreadable or does not match the request."""


class MissingSplitError(ManifestError):
    """The folder has no shards for the requested split (e.g. prepared without --val-fraction).

    Its own class so a caller can treat "no validation data" as optional without also
    swallowing a damaged or mismatched folder (other ManifestErrors).
    """
