"""The `data` section of the training config, and the layout checks to run before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DataConfig", "validate_data_parallel"]


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
    """Reconnections per request (remote paths) before a fetch error is raised."""
    timeout_s: float = 60.0
    """Socket timeout for remote paths, so a stalled server fails instead of hanging."""
    read_ahead: int = 8
    """HTTP Range requests (one per sample) in flight per reader for remote paths."""

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
        for name in ("samples_per_transfer", "read_ahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for p in self.paths:
            if p.startswith("pipe:"):
                raise ValueError(f"data.paths: {p} is a `pipe:` command, which reads a shard only from start to end; "
                                 "training reads each sample at its position: copy the folder to local disk or "
                                 "serve it over HTTP")
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

    @property
    def source_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.paths)


def validate_data_parallel(cfg: DataConfig, dp_size: int, micro_batch_size: int, global_batch_size: int) -> None:
    """Refuse a data-parallel layout the stream cannot serve identically; cheap, reads no files.

    Any data-parallel size works whose ranks split each global batch evenly into micro-batches.

    Raises:
        ValueError naming the option: global_batch_size must be a multiple of dp_size * micro_batch_size.
    """
    for name, value in (("dp_size", dp_size), ("micro_batch_size", micro_batch_size),
                        ("global_batch_size", global_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if global_batch_size % (dp_size * micro_batch_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a multiple of dp_size * micro_batch_size = "
            f"{dp_size} * {micro_batch_size} = {dp_size * micro_batch_size}"
        )
