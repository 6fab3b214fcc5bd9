"""The training-side stream: batches of (micro_batch, seq_len + 1) token ids, resumable exactly.

`build_stream` returns a `TokenStream` for one data-parallel rank. Which samples it yields is
fixed by `sample_order.SampleOrder` (see there): rank r of D reads the virtual streams v % D == r and
yields global samples r, r + D, r + 2D, ... of the run, in micro-batches, B / D samples per
global batch. With DataLoader workers, worker w of W produces every W-th of the rank's samples
and the training process puts them back in order, so workers change speed, not content.

Reading uses tarfile's stream mode (`shard_io.iter_shard_members`) on `remote.open_url`. A corrupt
sample (bad tar member, bad zstd, wrong length) is replaced by the next good sample of its
shuffle block (or, if the whole block is unreadable, a window of EOS tokens), counted and
logged; with `strict` it raises CorruptShardError. Replacing rather than dropping keeps every
rank's batch count equal, so a damaged shard can never desynchronise (hang) the ranks. The
replacements have a budget (`corrupt_budget`, data.max_corrupt_fraction): past it the stream
raises CorruptDataError, so a dataset that is mostly unreadable (a manifest that does not match
its shards, a damaged copy) stops within a batch or two instead of training on padding. Fetch
failures (a connection lost beyond its retries) always raise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from .config import DataConfig, validate_data_parallel
from .errors import CorruptDataError, CorruptShardError, DataExhaustedError, ManifestError, ShardFetchError
from .sample_order import EpochPlan, SampleOrder, Segment
from .manifest import Manifest, check_against_shards, load_manifest
from .remote import is_url, join_url, open_url
from .shard_io import CorruptSample, decode_sample, iter_shard_members, sample_extension, member_offsets

__all__ = ["TokenStream", "build_stream", "corrupt_budget", "STATE_VERSION"]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_OPEN_SHARDS = 256
"""Shards one rank (or DataLoader worker) keeps open at once; with more streams per rank than
this (a small DP size and the default 3072 streams), readers close and reopen shards between
blocks: a seek on files, a Range request over HTTP."""
_MAX_CORRUPT_WARNINGS = 20
_MAX_CORRUPT_SHARDS = 8

Origin = tuple[str, str]
"""(shard URL, reason) of a sample that could not be read and was replaced."""


def corrupt_budget(samples: int, fraction: float) -> int:
    """Replaced samples allowed among `samples`: max(1, floor(fraction x samples)).

    The floor of one forgives a single bad sample however early it comes; two or more count
    against the fraction, so an unreadable dataset fails at its first global batch (its second
    when a rank gets one sample per batch).
    """
    return max(1, int(fraction * samples))


@dataclass(frozen=True)
class _Source:
    """What a reader needs of one prepared folder: shard URLs and sizes."""

    folder: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class _ReadSpec:
    """Everything a (possibly forked) reader needs; small and picklable."""

    sources: tuple[_Source, ...]
    order: SampleOrder
    dtype: str
    window: int
    eos_id: int
    dp_rank: int
    dp_size: int
    strict: bool
    retries: int
    timeout_s: float


class _StreamReader:
    """Virtual stream v of one epoch, from a position on, decoded one shuffle block at a time.

    Between blocks its shard may be closed (`suspend`, by the rank's `_OpenShards`); the next
    block opens it again at the byte where reading stopped.
    """

    def __init__(self, spec: _ReadSpec, plan: EpochPlan, v: int, pos: int, met: list[int]) -> None:
        self.spec = spec
        self.plan = plan
        self.v = v
        first_block = pos // plan.window
        begin = plan.stream_start[v] + first_block * plan.window
        self._pieces = plan.pieces(begin, plan.stream_start[v] + plan.stream_len[v])
        self._piece = 0
        """Index in `_pieces` of the segment being read."""
        self._resume: tuple[int, int] | None = None
        """(next sample index, byte offset of a member header at or before it) in that segment's shard."""
        self._inputs: Iterator[tuple[bytes | None, str, str]] | None = None
        """The open reading position; None while no shard is open."""
        self._rows: list[np.ndarray] = []
        self._origins: list[Origin | None] = []
        self._perm: np.ndarray | None = None
        self._loaded = first_block - 1  # blocks before the start position are never read
        self._dctx = zstandard.ZstdDecompressor()
        self.met = met  # [unreadable samples read], shared by all readers of one rank/worker: caps the warnings

    @property
    def is_open(self) -> bool:
        return self._inputs is not None

    def suspend(self) -> None:
        """Close the shard being read; reading goes on from the same sample later."""
        if self._inputs is not None:
            self._inputs.close()
            self._inputs = None

    def get(self, pos: int) -> tuple[np.ndarray, Origin | None]:
        """The sample at stream position `pos` (positions must not decrease), and its origin if it is a replacement."""
        b = pos // self.plan.window
        while self._loaded < b:
            self._load_block()
        i = self._perm[pos - b * self.plan.window]
        return self._rows[i], self._origins[i]

    def _next_input(self) -> tuple[bytes | None, str, str]:
        if self._inputs is None:
            self._inputs = self._iter_inputs()
        return next(self._inputs)

    def _iter_inputs(self) -> Iterator[tuple[bytes | None, str, str]]:
        """(sample bytes, where, shard URL) in stream order; bytes None for samples that cannot be read."""
        while self._piece < len(self._pieces):
            seg = self._pieces[self._piece]
            src = self.spec.sources[seg.source]
            url = join_url(src.folder, src.names[seg.shard])
            for data, where in self._read_segment(seg, url):
                yield data, where, url
            self._piece += 1
            self._resume = None

    def _read_segment(self, seg: Segment, url: str) -> Iterator[tuple[bytes | None, str]]:
        """The segment's samples from `_resume` on; `_resume` names the next one before each is yielded."""
        src = self.spec.sources[seg.source]
        ext = "." + sample_extension(np.dtype(self.spec.dtype))
        want, at = self._resume or (seg.start, 0)
        if at == 0 and want > 0:  # a stream beginning inside a shard: straight to its first sample
            offsets = _member_offsets(url, src.sizes[seg.shard], self.spec.retries, self.spec.timeout_s)
            at = offsets[min(want, len(offsets) - 1)] if offsets else 0
        reason = ""
        try:
            f = open_url(url, expected_size=src.sizes[seg.shard], retries=self.spec.retries,
                         timeout=self.spec.timeout_s, offset=at)
        except FileNotFoundError as e:
            raise ManifestError(f"{url}: shard listed in the manifest is missing ({e})") from None
        read_to_end = False
        try:
            for idx, name, data, next_at in iter_shard_members(f, url, base_offset=at):
                if idx is None or idx < want:
                    at = next_at
                    continue
                while want < min(idx, seg.stop):
                    self._resume = (want + 1, at)  # member idx, not yet handed over, starts at `at`
                    yield None, f"{url}: sample {want} is missing"
                    want += 1
                if want >= seg.stop:
                    break
                where = f"{url}: sample {idx}"
                want, at = want + 1, next_at
                self._resume = (want, at)
                yield (data, where) if name.endswith(ext) else (None, f"{where}: {name} is not a {ext} member")
                if want >= seg.stop:
                    break
            else:
                read_to_end = True
        except CorruptSample as e:
            # Damaged bytes, or a `pipe:` command that failed mid-way: read to the end so that
            # closing can tell (a failed command must raise, not be counted as corruption).
            reason = str(e)
            try:
                while f.read(1 << 20):
                    pass
            except OSError as err:
                raise ShardFetchError(f"{url}: {err}") from None
            read_to_end = True
        finally:
            _close(f, url, check=read_to_end)
        while want < seg.stop:
            self._resume = (want + 1, 0)  # reopened, the damage is met again from the start
            yield None, reason or f"{url}: sample {want} is missing (shard ended early)"
            want += 1

    def _load_block(self) -> None:
        plan, spec = self.plan, self.spec
        b = self._loaded + 1
        size = min(plan.window, plan.stream_len[self.v] - b * plan.window)
        rows: list[np.ndarray | None] = []
        origins: list[Origin | None] = []
        bad: list[str] = []
        for _ in range(size):
            data, reason, url = self._next_input()
            row = None
            if data is not None:
                try:
                    row = decode_sample(data, np.dtype(spec.dtype), spec.window, self._dctx)
                except CorruptSample as e:
                    reason = f"{reason}: {e}"
            if row is None:
                if spec.strict:
                    raise CorruptShardError(f"{reason} (data.strict is set)")
                bad.append(reason)
            rows.append(row)
            origins.append(None if row is not None else (url, reason))
        if bad:
            rows = _fill_corrupt(rows, spec.window, spec.dtype, spec.eos_id)
            self.met[0] += len(bad)
            if self.met[0] - len(bad) < _MAX_CORRUPT_WARNINGS:
                logger.warning("replaced %d unreadable sample(s) of epoch %d stream %d block %d, e.g. %s",
                               len(bad), plan.epoch, self.v, b, bad[0])
        self._rows = rows
        self._origins = origins
        self._perm = plan.block_permutation(self.v, b)
        self._loaded = b


def _member_offsets(url: str, size: int, retries: int, timeout_s: float) -> tuple[int, ...]:
    """Where each sample of a shard starts, read once per process (per version of a local file):
    the many streams that begin inside one shard (3072 streams over few shards) seek there
    instead of reading to it."""
    version = None if is_url(url) and not url.startswith("file:") else os.stat(url.removeprefix("file://")).st_mtime_ns
    return _cached_member_offsets(url, size, version, retries, timeout_s)


@functools.lru_cache(maxsize=256)
def _cached_member_offsets(url: str, size: int, version: int | None, retries: int,
                           timeout_s: float) -> tuple[int, ...]:
    try:
        with open_url(url, expected_size=size, retries=retries, timeout=timeout_s) as f:
            return tuple(member_offsets(f))
    except FileNotFoundError as e:
        raise ManifestError(f"{url}: shard listed in the manifest is missing ({e})") from None
    except OSError as e:
        raise ShardFetchError(f"{url}: {e}") from None


def _close(f, url: str, *, check: bool) -> None:
    """Close a shard stream. A pipe (`pipe:` URLs) reports its command's failure only here, so a
    stream read to its end must close cleanly; one abandoned early may not (the command gets SIGPIPE)."""
    try:
        f.close()
    except OSError as e:
        if check:
            raise ShardFetchError(f"{url}: {e}") from None


def _fill_corrupt(rows: list, window: int, dtype: str, eos_id: int) -> list[np.ndarray]:
    """Each missing row becomes the next good row of the block (cyclically), else all EOS."""
    good = [i for i, r in enumerate(rows) if r is not None]
    if not good:
        pad = np.full(window, eos_id, dtype=dtype)
        return [pad] * len(rows)
    out = []
    for i, r in enumerate(rows):
        if r is None:
            k = next((j for j in good if j > i), good[0])
            r = rows[k]
        out.append(r)
    return out


def _rank_samples(spec: _ReadSpec, start: int, stop: int | None,
                  step: int) -> Iterator[tuple[np.ndarray, Origin | None]]:
    """This rank's samples start, start + step, ... (rank-local indices, over epochs): (row, origin if replaced)."""
    order, D, r = spec.order, spec.dp_size, spec.dp_rank
    per_rank_epoch = order.samples_per_epoch // D
    readers: dict[int, _StreamReader] = {}
    reading_epoch = -1
    open_shards = _OpenShards(MAX_OPEN_SHARDS)
    met = [0]
    J = start
    try:
        while stop is None or J < stop:
            epoch, j = divmod(J, per_rank_epoch)
            g = r + j * D
            plan = order.plan(epoch)
            v, pos = plan.slot_stream[g % order.V], g // order.V
            if epoch != reading_epoch:  # an epoch's readers are done once a later one starts
                for old in readers.values():
                    open_shards.forget(old)
                readers, reading_epoch = {}, epoch
            reader = readers.get(v)
            if reader is None:
                reader = readers[v] = _StreamReader(spec, plan, v, pos, met)
            sample = reader.get(pos)
            open_shards.used(reader)
            yield sample
            J += step
    finally:
        for reader in readers.values():
            reader.suspend()


class _OpenShards:
    """Caps the shards a rank's readers hold open: the least recently used reader is suspended
    (its shard closed, reopened at the same byte when it needs its next block)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lru: OrderedDict[int, _StreamReader] = OrderedDict()

    def used(self, reader: _StreamReader) -> None:
        if not reader.is_open:
            return
        self._lru[id(reader)] = reader
        self._lru.move_to_end(id(reader))
        while len(self._lru) > self.limit:
            _, oldest = self._lru.popitem(last=False)
            oldest.suspend()

    def forget(self, reader: _StreamReader) -> None:
        reader.suspend()
        self._lru.pop(id(reader), None)


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
        cfg = cfg.resolved()  # unset order settings: a new run's defaults (the trainer resolves resumed runs')
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
                             seed=cfg.seed, virtual_streams=cfg.virtual_streams, shuffle_window=cfg.shuffle_window,
                             global_batch_size=global_batch_size, shuffle=not one_pass,
                             order_version=cfg.order_version)
        if self.order.batches_per_epoch == 0:
            raise ValueError(
                f"data.paths {cfg.paths} ({cfg.split}) give {self.order.samples_per_epoch_total} samples per epoch, "
                f"fewer than one global batch of {global_batch_size}"
            )
        self.manifest_hash = hashlib.sha256(json.dumps(
            [[m.content_hash(cfg.split), w] for m, w in zip(manifests, cfg.source_weights)]).encode()).hexdigest()[:16]
        self._spec = _ReadSpec(
            sources=tuple(_Source(p, tuple(sh.name for sh in s.shards), tuple(sh.bytes for sh in s.shards))
                          for p, s in zip(cfg.paths, splits)),
            order=self.order, dtype=first.dtype, window=first.window, eos_id=self.eos_id, dp_rank=dp_rank,
            dp_size=dp_size, strict=cfg.strict, retries=cfg.retries, timeout_s=cfg.timeout_s)
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
            "virtual_streams": self.cfg.virtual_streams,
            "shuffle_window": self.cfg.shuffle_window,
            "order_version": self.cfg.order_version,
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
        mine = self.state_dict()
        sd = {"order_version": 1, **sd}  # states before the field: the first scheme
        for key, option in (("manifest_hash", "data.paths / data.weights (the prepared data)"),
                            ("seed", "data.seed"), ("global_batch_size", "global_batch_size"),
                            ("virtual_streams", "data.virtual_streams"), ("shuffle_window", "data.shuffle_window"),
                            ("order_version", "data.order_version")):
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
            yield from _rank_samples(self._spec, start, stop, 1)
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
