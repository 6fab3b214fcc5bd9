"""The training-side stream: batches of (micro_batch, seq_len + 1) token ids, resumable exactly.

`build_stream` returns a `TokenStream` for one data-parallel rank. Which samples it yields is
fixed by `sample_order.SampleOrder` (see there): rank r of D yields global samples r, r + D,
r + 2D, ... of the run, in micro-batches, B / D samples per global batch; any D dividing B reads
the same global batches. With DataLoader workers, worker w of W produces every W-th of the rank's
samples and the training process puts them back in order, so workers change speed, not content.

Each sample is one positioned read (`sample_reader`). A corrupt sample is replaced (counted and
logged; with `strict`, CorruptShardError); replacing rather than dropping keeps every rank's batch
count equal, so a damaged shard can never desynchronise (hang) the ranks. The replacements have a
budget (`corrupt_budget`, data.max_corrupt_fraction): past it the stream raises
CorruptDataError, so a dataset that is mostly unreadable (a manifest that does not match its
shards, a damaged copy) stops within a batch or two instead of training on padding. Fetch
failures (a connection lost beyond its retries) always raise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .config import DataConfig, validate_data_parallel
from .errors import CorruptDataError, DataExhaustedError, ManifestError
from .manifest import Manifest, check_against_shards, load_manifest
from .remote import join_url
from .sample_index import load_index
from .sample_order import ORDER_NAME, SampleOrder, check_saved_order
from .sample_reader import Origin, ReadSettings, SampleReader, Source

__all__ = ["TokenStream", "build_stream", "corrupt_budget", "STATE_VERSION"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_MAX_CORRUPT_SHARDS = 8
_CHUNK = 256
"""Samples located at once (one vectorised lookup in the epoch's permutations)."""


def corrupt_budget(samples: int, fraction: float) -> int:
    """Replaced samples allowed among `samples`: max(1, floor(fraction x samples)).

    The floor of one forgives a single bad sample however early it comes; two or more count
    against the fraction, so an unreadable dataset fails at its first global batch (its second
    when a rank gets one sample per batch).
    """
    return max(1, int(fraction * samples))


@dataclass(frozen=True)
class _ReadSpec:
    """Everything a (possibly forked) reader needs; picklable."""

    sources: tuple[Source, ...]
    order: SampleOrder
    settings: ReadSettings
    dp_rank: int
    dp_size: int


def _locations(spec: _ReadSpec, start: int, stop: int | None, step: int) -> Iterator[tuple[int, int, int]]:
    """(source, shard, index) of this rank's samples start, start + step, ... (rank-local indices, over epochs)."""
    order, D, r = spec.order, spec.dp_size, spec.dp_rank
    per_rank_epoch = order.samples_per_epoch // D
    J = start
    while stop is None or J < stop:
        epoch, j = divmod(J, per_rank_epoch)
        n = min(_CHUNK, -(-(per_rank_epoch - j) // step))
        if stop is not None:
            n = min(n, -(-(stop - J) // step))
        js = j + step * np.arange(n, dtype=np.int64)
        source, shard, index = order.epoch(epoch).locate(r + js * D)
        yield from zip(source.tolist(), shard.tolist(), index.tolist())
        J += n * step


def _rank_samples(spec: _ReadSpec, start: int, stop: int | None, step: int,
                  offsets=None) -> Iterator[tuple[np.ndarray, Origin | None]]:
    """This rank's samples start, start + step, ... (rank-local indices): (row, origin if replaced)."""
    reader = SampleReader(spec.sources, spec.settings, offsets)
    try:
        yield from reader.read(_locations(spec, start, stop, step))
    finally:
        reader.close()


class _WorkerDataset(torch.utils.data.IterableDataset):
    """One rank's samples for DataLoader workers: worker w makes every W-th, in slabs.

    A slab travels as (worker, slab index, rows, [(row in slab, origin)] of the replaced rows).
    """

    def __init__(self, spec: _ReadSpec, start: int, stop: int | None, slab: int) -> None:
        super().__init__()
        self.spec, self.start, self.stop, self.slab = spec, start, stop, slab

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        rows: list[np.ndarray] = []
        bad: list[tuple[int, Origin]] = []
        k = 0
        for row, origin in _rank_samples(self.spec, self.start + w, self.stop, W):
            if origin is not None:
                bad.append((len(rows), origin))
            rows.append(row)
            if len(rows) == self.slab:
                yield w, k, np.stack(rows), bad
                rows, bad, k = [], [], k + 1
        if rows:
            yield w, k, np.stack(rows), bad


def _identity(x):
    return x


def _worker_context() -> multiprocessing.context.BaseContext:
    """DataLoader workers start from a fork server, not by forking the training process: by the
    time the stream is iterated that process runs CUDA, NCCL and MLflow threads, whose locks and
    device state a forked child inherits half-held. The server preloads this module (torch), so
    a worker starts in a fraction of a second; where there is no fork server, spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class TokenStream:
    """Batches for one data-parallel rank; `state_dict` is the global consumed-sample count.

    Iterating yields LongTensors of shape (micro_batch_size, seq_len + 1): for each global batch,
    global_batch_size / dp_size / micro_batch_size micro-batches in order. Training streams
    run over epochs forever (or until data.max_epochs: DataExhaustedError); one-pass streams
    (evaluation) yield the manifest order once, from the start each time they are iterated.
    """

    def __init__(self, cfg: DataConfig, manifests: list[Manifest], *, dp_rank: int, dp_size: int,
                 micro_batch_size: int, global_batch_size: int, one_pass: bool = False,
                 max_batches: int | None = None) -> None:
        self.cfg = cfg
        self.manifests = manifests
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.one_pass = one_pass
        self.max_batches = max_batches
        first = manifests[0]
        self.seq_len: int = first.seq_len
        self.vocab_size: int = first.tokenizer["vocab_size"]
        self.eos_id: int = first.tokenizer["eos_id"]
        self.tokenizer_spec: str = "byte" if first.tokenizer["spec"] == "byte" else join_url(
            cfg.paths[0], first.tokenizer["file"])
        splits = [m.split(cfg.split) for m in manifests]
        self.order = SampleOrder([[sh.samples for sh in s.shards] for s in splits], weights=cfg.source_weights,
                                 seed=cfg.seed, global_batch_size=global_batch_size, shuffle=not one_pass)
        if self.order.batches_per_epoch == 0:
            raise ValueError(
                f"data.paths {cfg.paths} ({cfg.split}) give {self.order.samples_per_epoch_total} samples per epoch, "
                f"fewer than one global batch of {global_batch_size}"
            )
        self.manifest_hash = hashlib.sha256(json.dumps(
            [[m.content_hash(cfg.split), w] for m, w in zip(manifests, cfg.source_weights)]).encode()).hexdigest()[:16]
        sources = tuple(Source(p, cfg.split, s) for p, s in zip(cfg.paths, splits))
        # Checked here, before any step; DataLoader workers load their own copy.
        offsets = [load_index(src.folder, src.split, src.info) for src in sources]
        self._offsets = offsets if cfg.num_workers == 0 else None
        settings = ReadSettings(dtype=first.dtype, window=first.window, eos_id=self.eos_id, strict=cfg.strict,
                                retries=cfg.retries, timeout_s=cfg.timeout_s, read_ahead=cfg.read_ahead)
        self._spec = _ReadSpec(sources=sources, order=self.order, settings=settings, dp_rank=dp_rank, dp_size=dp_size)
        logger.info("data %s (%s): %d samples per epoch in %d global batches of %d; %d dropped per epoch "
                    "(the partial last batch)", cfg.paths, cfg.split, self.order.samples_per_epoch,
                    self.order.batches_per_epoch, global_batch_size, self.order.dropped_per_epoch)
        self.consumed_samples = 0
        self.corrupt_samples = 0
        """Replaced (unreadable) samples among those this rank handed over: exact, so a resume neither
        recounts nor forgets any. Per rank; the checkpointed value is the saving rank's."""
        self.corrupt_shards: list[str] = []
        """The first few shards (URLs) replaced samples came from, for the error message."""
        self._more_shards = False
        self._first_reason: str | None = None

    # ------------------------------------------------------------------ facts

    @property
    def samples_per_epoch(self) -> int:
        """Samples used per epoch (whole global batches); the rest are `dropped_per_epoch`."""
        return self.order.samples_per_epoch

    @property
    def dropped_per_epoch(self) -> int:
        return self.order.dropped_per_epoch

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.order.samples_per_epoch

    def __len__(self) -> int:
        """Micro-batches this rank yields per epoch (per pass for one-pass streams)."""
        batches = self.order.batches_per_epoch
        if self.max_batches is not None:
            batches = min(batches, self.max_batches)
        return batches * self.global_batch_size // self.dp_size // self.micro_batch_size

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "seed": self.cfg.seed,
            "manifest_hash": self.manifest_hash,
            "global_batch_size": self.global_batch_size,
            "order": ORDER_NAME,
            "epoch": self.epoch,
            "samples_per_epoch": self.order.samples_per_epoch,
            "dropped_per_epoch": self.order.dropped_per_epoch,
            "corrupt_samples": self.corrupt_samples,
            "corrupt_shards": list(self.corrupt_shards),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue after `sd["consumed_samples"]`; any data-parallel size or worker count works."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state version {sd.get('version')} is not {STATE_VERSION}")
        check_saved_order(sd)
        mine = self.state_dict()
        for key, option in (("manifest_hash", "data.paths / data.weights (the prepared data)"),
                            ("seed", "data.seed"), ("global_batch_size", "global_batch_size")):
            if sd.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume the data stream: the checkpoint has {key}={sd.get(key)!r}, this run "
                    f"{mine[key]!r}; {option} must stay the same for the sample order to continue"
                )
        consumed = int(sd["consumed_samples"])
        if consumed % self.global_batch_size:
            raise ValueError(f"consumed_samples={consumed} is not a multiple of global_batch_size")
        self.consumed_samples = consumed
        self.corrupt_samples = int(sd.get("corrupt_samples", 0))
        self.corrupt_shards = list(sd.get("corrupt_shards", []))[:_MAX_CORRUPT_SHARDS]

    # ------------------------------------------------------------------ iteration

    def _local_range(self) -> tuple[int, int | None]:
        """Rank-local sample indices [start, stop) this iteration covers."""
        D, B = self.dp_size, self.global_batch_size
        if self.one_pass:
            batches = self.order.batches_per_epoch
            if self.max_batches is not None:
                batches = min(batches, self.max_batches)
            return 0, batches * B // D
        start = self.consumed_samples // D
        stop = None
        if self.cfg.max_epochs is not None:
            stop = self.cfg.max_epochs * self.order.samples_per_epoch // D
        return start, stop

    def _rows(self, start: int, stop: int | None) -> Iterator[tuple[np.ndarray, Origin | None]]:
        """(row, origin if it is a replacement) for rank-local samples [start, stop)."""
        W = self.cfg.num_workers
        if W == 0:
            yield from _rank_samples(self._spec, start, stop, 1, self._offsets)
            return
        loader = torch.utils.data.DataLoader(
            _WorkerDataset(self._spec, start, stop, self.cfg.samples_per_transfer),
            batch_size=None, num_workers=W, collate_fn=_identity, prefetch_factor=4,
            multiprocessing_context=_worker_context())
        slabs: dict[tuple[int, int], tuple[np.ndarray, dict[int, Origin]]] = {}
        it = iter(loader)
        k = self.cfg.samples_per_transfer
        J = start
        while stop is None or J < stop:
            w, i = (J - start) % W, (J - start) // W
            key = (w, i // k)
            while key not in slabs:  # workers may finish unevenly at the end: index by (worker, slab)
                sw, si, arr, bad = next(it)
                slabs[(sw, si)] = arr, dict(bad)
            slab, bad = slabs[key]
            t = i % k
            if t == len(slab) - 1:
                del slabs[key]
            yield slab[t], bad.get(t)
            J += 1

    def _count_corrupt(self, origin: Origin) -> None:
        """One replaced sample handed over: counted, and its shard kept for the error message (bounded)."""
        self.corrupt_samples += 1
        url = origin[0]
        if url not in self.corrupt_shards:
            if len(self.corrupt_shards) < _MAX_CORRUPT_SHARDS:
                self.corrupt_shards.append(url)
            else:
                self._more_shards = True
        if self._first_reason is None:
            self._first_reason = origin[1]

    def _check_budget(self, pass_corrupt: int, pass_batches: int) -> None:
        """At the end of a global batch: CorruptDataError if this rank's replaced samples exceed `corrupt_budget`.

        Training streams count since the run began (restored by load_state_dict); one-pass streams per pass.
        """
        per_rank = self.global_batch_size // self.dp_size
        if self.one_pass:
            corrupt, samples = self.corrupt_samples - pass_corrupt, pass_batches * per_rank
        else:
            corrupt, samples = self.corrupt_samples, self.consumed_samples // self.dp_size + per_rank
        f = self.cfg.max_corrupt_fraction
        allowed = corrupt_budget(samples, f)
        if corrupt <= allowed:
            return
        more = " and more" if self._more_shards else ""
        first = f" (first: {self._first_reason})" if self._first_reason else ""
        raise CorruptDataError(
            f"data-parallel rank {self.dp_rank}: {corrupt} of the {samples} samples it read from {self.cfg.paths} "
            f"({self.cfg.split}) were unreadable and replaced, over the budget of {allowed} "
            f"(max(1, data.max_corrupt_fraction={f:g} x samples)); they came from "
            f"{', '.join(self.corrupt_shards)}{more}{first}; run `hippo data verify` on the folder and re-run "
            "`hippo data prepare` for it, or raise data.max_corrupt_fraction to train on regardless"
        )

    def __iter__(self) -> Iterator[torch.Tensor]:
        start, stop = self._local_range()
        if self.one_pass:
            self.consumed_samples = 0
        per_rank = self.global_batch_size // self.dp_size
        micro_per_batch = per_rank // self.micro_batch_size
        pass_corrupt, pass_batches = self.corrupt_samples, 0  # one-pass streams: each pass has its own budget
        m = 0
        batch: list[np.ndarray] = []
        for row, origin in self._rows(start, stop):
            if origin is not None:
                self._count_corrupt(origin)
            batch.append(row)
            if len(batch) < self.micro_batch_size:
                continue
            out = torch.from_numpy(np.stack(batch).astype(np.int64))
            batch = []
            m += 1
            if m == micro_per_batch:
                # Checked before the last micro-batch is handed over: an over-budget batch is never stepped on.
                m, pass_batches = 0, pass_batches + 1
                self._check_budget(pass_corrupt, pass_batches)
                # Counted as the last micro-batch is handed over: a checkpoint after step k has k batches.
                self.consumed_samples += self.global_batch_size
            yield out
        if not self.one_pass:
            raise DataExhaustedError(
                f"data stream exhausted after data.max_epochs={self.cfg.max_epochs} epochs "
                f"({self.consumed_samples} samples)"
            )


def build_stream(cfg: DataConfig, *, dp_rank: int, dp_size: int, micro_batch_size: int, global_batch_size: int,
                 one_pass: bool = False, max_batches: int | None = None) -> TokenStream:
    """The batch stream of data-parallel rank `dp_rank` of `dp_size`.

    Tensor- and pipeline-parallel ranks of the same data-parallel rank must pass the same
    dp_rank: they receive identical batches. Call `validate_data_parallel` first to fail before
    any process does work; this repeats it and also checks the manifests agree.

    Args:
        one_pass: evaluation mode: no shuffling, one pass in manifest order, then stop.
        max_batches: with one_pass, stop after this many global batches.
    """
    validate_data_parallel(cfg, dp_size, micro_batch_size, global_batch_size)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, dp_size={dp_size})")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    manifests = [load_manifest(p) for p in cfg.paths]
    for p, m in zip(cfg.paths, manifests):
        check_against_shards(p, m, cfg.split)
    first = manifests[0]
    for p, m in zip(cfg.paths[1:], manifests[1:]):
        if (m.seq_len, m.tokenizer["hash"]) != (first.seq_len, first.tokenizer["hash"]):
            raise ManifestError(
                f"data.paths mix incompatible data: {cfg.paths[0]} has seq_len={first.seq_len}, tokenizer "
                f"{first.tokenizer['name']} ({first.tokenizer['hash']}); {p} has seq_len={m.seq_len}, "
                f"tokenizer {m.tokenizer['name']} ({m.tokenizer['hash']})"
            )
    return TokenStream(cfg, manifests, dp_rank=dp_rank, dp_size=dp_size, micro_batch_size=micro_batch_size,
                       global_batch_size=global_batch_size, one_pass=one_pass, max_batches=max_batches)
