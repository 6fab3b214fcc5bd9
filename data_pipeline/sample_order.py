"""The global sample order: a pure function of (sources, weights, seed, epoch, global index).

Epoch e of a run is laid out in two seeded permutations, Megatron's global index:

1. Per source (a prepared folder's split), an endless sequence of its samples: its shards in
   an order shuffled per source-epoch, concatenated. Mixture epoch e takes the next
   `round(weight x samples)` of them (weight 2.0 = two passes, 0.5 = half, the other half next
   epoch: the Pile's "epochs per component"). Shards, not samples, are shuffled here: step 2
   places every sample anyway, so this only decides which shards a partial pass takes.
2. The N samples the sources give epoch e are placed by one pseudo-random permutation of
   [0, N) seeded with (seed, epoch) (`FeistelPermutation`, computed per index): sample g of the
   epoch is the one at position perm(g). A global batch therefore holds a uniform-looking draw
   over the whole mixture: samples of many shards and sources.

Global batch k holds samples [k*B, (k+1)*B) of this order; data-parallel rank r of D reads
samples kB + r, kB + r + D, ... of it (B / D each). Nothing here depends on D, so every D that
divides B reads the same batches, and the state to resume is one number: the global count of
consumed samples. The last N % B samples of an epoch are dropped (counted).

Memory and set-up: the shard orders of step 1 (one entry per shard); nothing per sample.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["SampleOrder", "EpochOrder", "FeistelPermutation", "ORDER_NAME", "check_saved_order"]

_TAG_SOURCE, _TAG_MIX = 0, 1

ORDER_NAME = "global-permutation-1"
"""Identity of this scheme, saved with the stream state: another scheme's state is refused."""
_LAST_STREAM_ORDER_HIPPO = "Hippo 0.1.0 up to commit 9307dce"


def check_saved_order(state: dict) -> None:
    """Refuse a saved stream state of another sample order (the virtual-stream orders before this one).

    Raises:
        ValueError, one line: which order the state has and which Hippo reads it.
    """
    if state.get("order") == ORDER_NAME:
        return
    if "virtual_streams" in state or "order" not in state:
        streams = state.get("virtual_streams", "?")
        raise ValueError(
            f"the checkpoint's data stream follows the {streams}-virtual-stream sample order, which this Hippo no "
            f"longer reads (it reads a global permutation); resume it with {_LAST_STREAM_ORDER_HIPPO}, or start "
            "a new --run-dir")
    raise ValueError(f"the checkpoint's data stream follows sample order {state['order']!r}, this Hippo reads "
                     f"{ORDER_NAME!r}; resume it with the Hippo that wrote it")


def _permutation(seed: list[int], n: int) -> np.ndarray:
    """A seeded permutation of [0, n) as an array (for shard orders: a few thousand entries)."""
    return np.random.default_rng(seed).permutation(n)


class FeistelPermutation:
    """A seeded pseudo-random permutation of [0, n), computed per index instead of stored.

    A balanced Feistel network on the smallest even-bit domain 2^(2h) >= n (each round mixes one
    half into the other with a keyed 64-bit hash), walked until the value falls inside [0, n): a
    bijection of [0, n) (Black & Rogaway's cycle walking), at most 4 domain steps per index on
    average. Neither memory nor set-up grows with n, so a 300B-token manifest starts as fast as
    a tiny one, and every DataLoader worker evaluates only the indices it reads.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: list[int]) -> None:
        self.n = n
        self.half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def _round(self, x: np.ndarray, key: np.uint64) -> np.ndarray:
        z = x ^ key  # splitmix64's finaliser: every input bit reaches every output bit
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _step(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << h) | right

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = self._step(x)
            outside = np.flatnonzero(x >= self.n)
            while outside.size:
                x[outside] = self._step(x[outside])
                outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)


class EpochOrder:
    """One epoch's permutations; `locate` maps epoch sample indices to (source, shard, index)."""

    def __init__(self, order: SampleOrder, epoch: int) -> None:
        self.order = order
        self.epoch = epoch
        self.mix = (FeistelPermutation(order.samples_per_epoch_total, [order.seed, _TAG_MIX, epoch])
                    if order.shuffle else None)
        self._shard_orders: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        """(source, source-epoch) -> (its shards in reading order, where each begins in that order)."""
        for s, (n, t) in enumerate(zip(order.slots, order.source_total)):
            counts = order.shard_counts[s]
            for se in range(epoch * n // t, ((epoch + 1) * n - 1) // t + 1):
                shards = (_permutation([order.seed, _TAG_SOURCE, s, se], len(counts)) if order.shuffle
                          else np.arange(len(counts)))
                starts = np.concatenate([[0], np.cumsum(counts[shards])[:-1]])
                self._shard_orders[s, se] = shards, starts

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, shard, index in shard) arrays of epoch samples `g` (an int array, each < samples_per_epoch)."""
        o = self.order
        g = np.asarray(g, dtype=np.int64)
        p = self.mix[g] if self.mix is not None else g
        source = np.searchsorted(o.slot_starts, p, side="right") - 1
        shard = np.empty_like(p)
        index = np.empty_like(p)
        for s in np.unique(source).tolist():
            at = np.flatnonzero(source == s)
            se, off = np.divmod(self.epoch * o.slots[s] + (p[at] - o.slot_starts[s]), o.source_total[s])
            for e in np.unique(se).tolist():
                here = se == e
                shards, starts = self._shard_orders[s, e]
                k = np.searchsorted(starts, off[here], side="right") - 1
                shard[at[here]] = shards[k]
                index[at[here]] = off[here] - starts[k]
        return source, shard, index


class SampleOrder:
    """Epoch orders for a set of sources, and the batch arithmetic on top of them.

    Args:
        shard_samples: per source, the sample count of each shard (manifest order).
        weights: per source, passes per epoch (1.0 = every sample once).
        seed: run seed; with the epoch number it fixes every permutation.
        global_batch_size: B; each epoch uses the largest multiple of B samples it has.
        shuffle: False gives the manifest order, sources one after the other (one pass for evaluation).
    """

    def __init__(self, shard_samples: list[list[int]], *, weights: list[float], seed: int, global_batch_size: int,
                 shuffle: bool = True) -> None:
        self.shard_counts = [np.asarray(s, dtype=np.int64) for s in shard_samples]
        self.source_total = [int(sum(s)) for s in shard_samples]
        if any(t == 0 for t in self.source_total):
            raise ValueError("every source needs at least one sample")
        self.weights = list(weights)
        self.seed = seed
        self.B = global_batch_size
        self.shuffle = shuffle
        # Samples each source contributes per epoch; a positive weight always contributes.
        self.slots = [max(1, round(w * t)) if shuffle else t for w, t in zip(self.weights, self.source_total)]
        self.slot_starts = np.concatenate([[0], np.cumsum(self.slots, dtype=np.int64)[:-1]])
        self.samples_per_epoch_total = sum(self.slots)
        self.batches_per_epoch = self.samples_per_epoch_total // self.B
        self.samples_per_epoch = self.batches_per_epoch * self.B
        """Samples used per epoch: whole global batches only."""
        self.dropped_per_epoch = self.samples_per_epoch_total - self.samples_per_epoch
        self._epochs: OrderedDict[int, EpochOrder] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_epochs": OrderedDict()}  # DataLoader workers build their own

    def epoch(self, epoch: int) -> EpochOrder:
        """Epoch `epoch`'s permutations; the last two are kept (readers move through epochs in order)."""
        if epoch not in self._epochs:
            self._epochs[epoch] = EpochOrder(self, epoch)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def locate(self, global_index: int) -> tuple[int, int, int]:
        """(source, shard, index) of the run's global sample `global_index` (over epochs)."""
        epoch, g = divmod(global_index, self.samples_per_epoch)
        source, shard, index = self.epoch(epoch).locate(np.array([g]))
        return int(source[0]), int(shard[0]), int(index[0])
