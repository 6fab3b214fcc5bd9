"""The `data` section of the training config, and the layout checks to run before any work."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from .sample_order import DEFAULT_SHUFFLE_WINDOW, DEFAULT_VIRTUAL_STREAMS, ORDER_VERSION, supported_dp_sizes

__all__ = ["DataConfig", "validate_data_parallel"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DataConfig:
    """Where training data comes from and how it is ordered."""

    paths: list[str]
    """Prepared folders: local paths or URL prefixes (e.g. http://127.0.0.1:8000/pile)."""
    weights: list[float] | None = None
    """Per folder, passes over it per epoch (the Pile's per-component epochs); None = 1.0 each."""
    seed: int = 1234
    """Fixes the order of every epoch (with the epoch number)."""
    num_workers: int = 0
    """DataLoader worker processes per data-parallel rank (0 = read in the training process)."""
    shuffle_window: int | None = None
    """Samples per block of each virtual stream's in-stream shuffle (memory: window x seq_len x 2 B per
    stream). None: the run's own (see `resolved`), for a new run DEFAULT_SHUFFLE_WINDOW (4)."""
    virtual_streams: int | None = None
    """Fixed number of sample streams; the supported data-parallel sizes are its divisors. None: the
    run's own (see `resolved`), for a new run DEFAULT_VIRTUAL_STREAMS (3072 = 2^10 x 3)."""
    order_version: int | None = None
    """Interleave scheme of the sample order (sample_order.ORDER_VERSION); None: the run's own."""
    strict: bool = False
    """Raise on a corrupt sample instead of replacing it (counted and logged) and continuing."""
    max_corrupt_fraction: float = 0.001
    """Budget of replaced (unreadable) samples: CorruptDataError once a rank's count exceeds
    max(1, fraction x its samples so far), checked per global batch (see stream.corrupt_budget)."""
    split: str = "train"
    """Which split of the prepared folders to read: train or validation."""
    max_epochs: int | None = None
    """Raise DataExhaustedError after this many epochs; None = repeat forever."""
    samples_per_transfer: int = 32
    """Samples a DataLoader worker sends to the training process at a time."""
    retries: int = 5
    """Reconnections per shard (remote paths) before a fetch error is raised."""
    timeout_s: float = 60.0
    """Socket timeout for remote paths, so a stalled server fails instead of hanging."""

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            raise ValueError(f"data.paths must be a list of folders, got the string {self.paths!r}")
        self.paths = [str(p) for p in self.paths]
        if not self.paths:
            raise ValueError("data.paths must name at least one prepared folder")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.paths):
                raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.paths)} data.paths")
            bad = [w for w in self.weights if not (math.isfinite(w) and w > 0)]
            if bad:
                raise ValueError(f"data.weights must be finite and > 0, got {bad}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed must be an integer >= 0, got {self.seed!r}")
        for name in ("shuffle_window", "virtual_streams", "samples_per_transfer"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.order_version not in (None, 1, 2):
            raise ValueError(f"data.order_version must be 1 or 2 (or unset), got {self.order_version!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        f = self.max_corrupt_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"data.max_corrupt_fraction must be a number in [0, 1] (0.001 = one sample in a "
                             f"thousand may be unreadable), got {f!r}")
        self.max_corrupt_fraction = float(f)
        if self.retries < 0:
            raise ValueError(f"data.retries must be >= 0, got {self.retries}")
        if self.timeout_s <= 0:
            raise ValueError(f"data.timeout_s must be > 0, got {self.timeout_s}")
        if self.split not in ("train", "validation"):
            raise ValueError(f"data.split must be 'train' or 'validation', got {self.split!r}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"data.max_epochs must be >= 1 or None, got {self.max_epochs}")

    def resolved(self, saved_stream_state: dict[str, Any] | None = None) -> DataConfig:
        """The order settings left unset filled in: from a checkpoint's data-stream state when
        resuming (a run keeps the order it began with, whatever today's defaults), else the defaults."""
        saved = saved_stream_state or {}
        old_run = bool(saved)
        return replace(
            self,
            virtual_streams=self.virtual_streams or saved.get("virtual_streams") or DEFAULT_VIRTUAL_STREAMS,
            shuffle_window=self.shuffle_window or saved.get("shuffle_window") or DEFAULT_SHUFFLE_WINDOW,
            # States written before the field existed used scheme 1.
            order_version=self.order_version or saved.get("order_version", 1 if old_run else ORDER_VERSION),
        )

    @property
    def streams(self) -> int:
        """data.virtual_streams, its default when unset."""
        return self.virtual_streams or DEFAULT_VIRTUAL_STREAMS

    @property
    def source_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.paths)


def validate_data_parallel(cfg: DataConfig, dp_size: int, micro_batch_size: int, global_batch_size: int) -> None:
    """Refuse a data-parallel layout the stream cannot serve identically; cheap, reads no files.

    Raises:
        ValueError naming the option: dp_size must divide data.virtual_streams, and
        global_batch_size must be a multiple of dp_size * micro_batch_size.
    """
    for name, value in (("dp_size", dp_size), ("micro_batch_size", micro_batch_size),
                        ("global_batch_size", global_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if cfg.streams % dp_size:
        raise ValueError(
            f"data-parallel size {dp_size} does not divide data.virtual_streams={cfg.streams}; "
            f"supported data-parallel sizes: {_listed(supported_dp_sizes(cfg.streams))} "
            "(raise data.virtual_streams to a multiple of the DP sizes you need; it changes the sample order)"
        )
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a multiple of dp_size * micro_batch_size = "
            f"{dp_size} * {micro_batch_size} = {dp_size * micro_batch_size}"
        )
    per_worker = cfg.streams // dp_size
    if cfg.num_workers > 1 and per_worker % cfg.num_workers:
        logger.warning(
            "data.num_workers=%d does not divide the %d virtual streams of each rank: every worker reads "
            "all of its rank's streams and keeps 1/%d of the samples (correct, but %dx the reading)",
            cfg.num_workers, per_worker, cfg.num_workers, cfg.num_workers,
        )


def _listed(sizes: list[int], limit: int = 24) -> str:
    return str(sizes) if len(sizes) <= limit else f"[{', '.join(map(str, sizes[:limit]))}, ...]"
