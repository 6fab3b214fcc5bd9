"""The global sample order, as a pure function of (sources, weights, seed, epoch).

Epoch e of a run is laid out in four steps:

1. Segments. Each source (a prepared folder's split) is an endless sequence of its samples:
   its shards in an order shuffled per source-epoch, concatenated. Mixture epoch e takes the
   next `round(weight * samples)` of them from each source (weight 2.0 = two passes, 0.5 =
   half, the other half next epoch: the Pile's "epochs per component" style). The resulting
   shard ranges ("segments") of all sources are shuffled together.
2. Virtual streams. The concatenated segments are cut into `V` contiguous ranges of equal
   length (+-1): stream v reads whole shards, except at most one at each end.
3. Window shuffle. Each stream permutes its samples within consecutive blocks of
   `shuffle_window` samples, by a permutation seeded with (seed, epoch, v, block). Blocks (not a
   reservoir) make position j of a stream computable without replaying the stream: resuming
   reads at most one block and one partial shard per stream.
4. Interleave. Global sample g of the epoch is position g // V of the stream in slot g % V.
   Order version 2 (new runs) fills the V slots with the streams in an order shuffled per
   epoch, so that neighbours in the order come from far-apart data even when the streams are
   short (many streams over a small corpus); version 1 (runs begun by Hippo 0.1/0.2, resumed
   with their order) has stream v in slot v.

Global batch k holds samples [k*B, (k+1)*B) of this order. A data-parallel rank r of D (D | V)
takes the samples with g % D == r, which all come from the streams of its slots s % D == r; any
window of B consecutive g (D | B) has exactly B / D of them. So the samples of batch k do not
depend on D or on the number of DataLoader workers, and the state to resume is one number,
the global count of consumed samples. The last N % B samples of an epoch are dropped (counted).

The default V is 3072 = 2^10 x 3, so every DP size 2^a or 3 x 2^a up to 3072 (1 ... 1024, 12, 24,
48, 96, 768, ...) reads the same order; each rank then follows V / D streams at once (memory:
V / D x shuffle_window samples; the readers keep at most `stream.MAX_OPEN_SHARDS` shards open).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["Segment", "EpochPlan", "SampleOrder", "supported_dp_sizes", "DEFAULT_VIRTUAL_STREAMS",
           "DEFAULT_SHUFFLE_WINDOW", "ORDER_VERSION"]

_TAG_SOURCE, _TAG_MIX, _TAG_BLOCK, _TAG_SLOTS = 0, 1, 2, 3

DEFAULT_VIRTUAL_STREAMS = 3072
"""2^10 x 3: its divisors are every data-parallel size a cluster uses (powers of two, 3 x 2^a)."""
DEFAULT_SHUFFLE_WINDOW = 4
"""Samples per in-stream shuffle block: 3072 streams x 4 = 12288 samples held by a DP-1 reader
(~50 MB at seq_len 2048); the per-epoch slot shuffle does most of the mixing."""
ORDER_VERSION = 2
"""Order scheme of new runs: 2 = streams shuffled over the slots per epoch; 1 = slot v holds stream v."""


def supported_dp_sizes(virtual_streams: int) -> list[int]:
    """The data-parallel sizes a layout with `virtual_streams` streams supports: its divisors."""
    return [d for d in range(1, virtual_streams + 1) if virtual_streams % d == 0]


@dataclass(frozen=True, slots=True)
class Segment:
    """Samples [start, stop) of shard `shard` of source `source`."""

    source: int
    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class EpochPlan:
    """One epoch's layout: segments, stream boundaries and block permutations."""

    def __init__(self, segments: list[Segment], *, epoch: int, seed: int, virtual_streams: int,
                 shuffle_window: int, shuffle: bool, order_version: int = ORDER_VERSION) -> None:
        self.segments = segments
        self.epoch = epoch
        self.seed = seed
        self.V = virtual_streams
        self.window = shuffle_window
        self.shuffle = shuffle
        self.ends = np.cumsum([s.size for s in segments]).tolist()
        self.total = self.ends[-1] if self.ends else 0
        self.slot_stream: list[int] = list(range(self.V))
        """The stream read in each interleave slot (slot of sample g: g % V)."""
        if shuffle and order_version >= 2:
            self.slot_stream = np.random.default_rng([seed, _TAG_SLOTS, epoch]).permutation(self.V).tolist()
        # The first total % V slots get the streams one sample longer: the interleave's last round.
        q, r = divmod(self.total, self.V)
        self.stream_len = [0] * self.V
        for slot, v in enumerate(self.slot_stream):
            self.stream_len[v] = q + (slot < r)
        self.stream_start = np.concatenate([[0], np.cumsum(self.stream_len)[:-1]]).astype(int).tolist()

    def block_permutation(self, v: int, block: int) -> np.ndarray:
        """Order of the samples of block `block` of stream v (identity without shuffle)."""
        size = min(self.window, self.stream_len[v] - block * self.window)
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, _TAG_BLOCK, self.epoch, v, block]).permutation(size)

    def pieces(self, begin: int, end: int) -> list[Segment]:
        """Segments covering concatenated positions [begin, end), cut to that range, in order."""
        out = []
        i = bisect.bisect_right(self.ends, begin)
        while begin < end and i < len(self.segments):
            seg = self.segments[i]
            seg_begin = self.ends[i] - seg.size
            lo = seg.start + (begin - seg_begin)
            hi = seg.start + min(end, self.ends[i]) - seg_begin
            out.append(Segment(seg.source, seg.shard, lo, hi))
            begin = self.ends[i]
            i += 1
        return out

    def locate(self, g: int) -> tuple[int, int, int]:
        """(source, shard, index in shard) of epoch sample g: the reference for the stream readers."""
        v, j = self.slot_stream[g % self.V], g // self.V
        if j >= self.stream_len[v]:
            raise IndexError(f"sample {g} is beyond this epoch's {self.total} samples")
        b = j // self.window
        pos = self.stream_start[v] + b * self.window + int(self.block_permutation(v, b)[j - b * self.window])
        (seg,) = self.pieces(pos, pos + 1)
        return seg.source, seg.shard, seg.start


class SampleOrder:
    """Epoch plans for a set of sources, and the batch arithmetic on top of them.

    Args:
        shard_samples: per source, the sample count of each shard (manifest order).
        weights: per source, passes per epoch (1.0 = every sample once).
        seed: run seed; with the epoch number it fixes every permutation.
        virtual_streams: V, the number of streams (the supported DP sizes are its divisors).
        shuffle_window: samples per block of the in-stream shuffle.
        order_version: the interleave scheme (see the module docstring); 1 reproduces older runs.
        global_batch_size: B; each epoch uses the largest multiple of B samples it has.
        shuffle: False gives the manifest order (one pass for evaluation).
    """

    def __init__(self, shard_samples: list[list[int]], *, weights: list[float], seed: int, virtual_streams: int,
                 shuffle_window: int, global_batch_size: int, shuffle: bool = True,
                 order_version: int = ORDER_VERSION) -> None:
        if order_version not in (1, 2):
            raise ValueError(f"order_version must be 1 or 2, got {order_version}")
        self.order_version = order_version
        self.shard_samples = [list(s) for s in shard_samples]
        self.source_total = [sum(s) for s in self.shard_samples]
        if any(t == 0 for t in self.source_total):
            raise ValueError("every source needs at least one sample")
        self.weights = list(weights)
        self.seed = seed
        self.V = virtual_streams
        self.window = shuffle_window
        self.B = global_batch_size
        self.shuffle = shuffle
        # Samples each source contributes per epoch; a positive weight always contributes.
        self.slots = [max(1, round(w * t)) if shuffle else t for w, t in zip(self.weights, self.source_total)]
        self.samples_per_epoch_total = sum(self.slots)
        self.batches_per_epoch = self.samples_per_epoch_total // self.B
        self.samples_per_epoch = self.batches_per_epoch * self.B
        """Samples used per epoch: whole global batches only."""
        self.dropped_per_epoch = self.samples_per_epoch_total - self.samples_per_epoch

    def _source_order(self, source: int, source_epoch: int) -> list[int]:
        n = len(self.shard_samples[source])
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, _TAG_SOURCE, source, source_epoch]).permutation(n).tolist()

    def _source_segments(self, source: int, begin: int, end: int) -> list[Segment]:
        """Positions [begin, end) of a source's endless sequence, as shard segments."""
        counts, total = self.shard_samples[source], self.source_total[source]
        out = []
        while begin < end:
            se, off = divmod(begin, total)
            pos = 0
            for shard in self._source_order(source, se):
                n = counts[shard]
                lo, hi = max(off, pos), min(off + (end - begin), pos + n)
                if lo < hi:
                    out.append(Segment(source, shard, lo - pos, hi - pos))
                pos += n
            begin += min(end - begin, total - off)
        return out

    @functools.lru_cache(maxsize=4)
    def plan(self, epoch: int) -> EpochPlan:
        segments: list[Segment] = []
        for i, n in enumerate(self.slots):
            segments += self._source_segments(i, epoch * n, (epoch + 1) * n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, _TAG_MIX, epoch]).permutation(len(segments))
            segments = [segments[k] for k in order]
        return EpochPlan(segments, epoch=epoch, seed=self.seed, virtual_streams=self.V,
                         shuffle_window=self.window, shuffle=self.shuffle, order_version=self.order_version)

    def locate(self, global_index: int) -> tuple[int, int, int]:
        """(source, shard, index) of the run's global sample `global_index` (over epochs)."""
        epoch, g = divmod(global_index, self.samples_per_epoch)
        return self.plan(epoch).locate(g)
