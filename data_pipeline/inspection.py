"""`hippo data inspect` (summary + a few decoded samples) and `hippo data verify` (full re-check)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import zstandard

from .errors import ManifestError
from .manifest import Manifest, SplitInfo, check_against_shards, load_manifest
from .sample_index import ShardOffsets, load_index
from .remote import join_url, open_url
from .shard_io import CorruptSample, decode_sample, iter_shard_members
from .tokenizer import load_tokenizer

__all__ = ["summarize", "decoded_samples", "verify", "VerifyReport"]


def _fmt(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def summarize(m: Manifest, folder: str) -> str:
    """A human-readable summary of a manifest."""
    t = m.tokenizer
    lines = [
        f"{folder}",
        f"  tokenizer: {t['name']} (vocab {t['vocab_size']}, eos {t['eos_id']}, hash {t['hash']})",
        f"  seq_len: {m.seq_len} (windows of {m.window} tokens, {m.dtype})",
    ]
    for name, s in m.splits.items():
        if not s.shards:
            continue
        size = sum(sh.bytes for sh in s.shards)
        lines.append(f"  {name}: {s.samples} samples in {len(s.shards)} shards ({_fmt(size)}B), "
                     f"{s.documents} documents, {_fmt(s.tokens)} tokens (+{s.pad_tokens} padding)")
        for set_name, c in sorted(s.set_names.items(), key=lambda kv: -kv[1]["tokens"]):
            lines.append(f"    {set_name}: {c['documents']} docs, {_fmt(c['tokens'])} tokens")
    skipped = m.skipped()
    lines.append("  skipped records: " + (", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"))
    for s in m.splits.values():
        for ex in s.skipped_examples[:5]:
            lines.append(f"    {ex['file']}:{ex['line']}: {ex['reason']}: {ex['detail']}")
    lines.append(f"  sources: {len(m.inputs)} files")
    for inp in m.inputs[:20]:
        info = f" {inp['info']}" if "info" in inp else ""
        lines.append(f"    {inp['path']} ({_fmt(inp['bytes'])}B, {inp['split']}){info}")
    return "\n".join(lines)


def decoded_samples(folder: str, *, split: str = "train", count: int = 3, max_chars: int = 300) -> list[str]:
    """The first `count` samples of a split's first shard, decoded back to text."""
    m = load_manifest(folder)
    check_against_shards(folder, m, split)  # else a mismatched manifest fails below without saying why
    tok = load_tokenizer(folder)
    shard = m.split(split).shards[0]
    url = join_url(folder, shard.name)
    out = []
    dctx = zstandard.ZstdDecompressor()
    with open_url(url, expected_size=shard.bytes) as f:
        for member in iter_shard_members(f, url):
            ids = decode_sample(member.data, np.dtype(m.dtype), m.window, dctx)
            text = tok.decode(ids.tolist())
            out.append(text[:max_chars] + ("..." if len(text) > max_chars else ""))
            if len(out) == count:
                break
    return out


class _HashingReader(io.RawIOBase):
    def __init__(self, f) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.f.read(len(buf))
        buf[:len(data)] = data
        self.sha.update(data)
        self.n += len(data)
        return len(data)


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_shard(folder: str, m: Manifest, name: str, samples: int, size: int, sha: str,
                 offsets: np.ndarray | None = None) -> Iterator[str]:
    """Problems of one shard; `offsets`: its entries in the split's index, to compare with its members."""
    url = join_url(folder, name)
    dctx = zstandard.ZstdDecompressor()
    try:
        f = open_url(url, expected_size=size)
    except FileNotFoundError:
        yield f"{name}: missing"
        return
    with f:
        h = _HashingReader(f)
        n = 0
        found = [0]
        try:
            for idx, member, data, end in iter_shard_members(io.BufferedReader(h), url):
                found.append(end)
                if idx != n:
                    yield f"{name}: member {member} out of order (expected sample {n})"
                try:
                    decode_sample(data, np.dtype(m.dtype), m.window, dctx)
                except CorruptSample as e:
                    yield f"{name}: sample {n}: {e}"
                n += 1
        except CorruptSample as e:
            yield f"{name}: {e}"
        while h.readinto(bytearray(1 << 20)):
            pass  # hash the trailing padding too
    if n != samples:
        yield f"{name}: {n} samples, manifest says {samples}"
    if h.n != size:
        yield f"{name}: {h.n} bytes, manifest says {size}"
    if h.sha.hexdigest() != sha:
        yield f"{name}: sha256 {h.sha.hexdigest()[:16]}... differs from the manifest"
    if offsets is not None and found != offsets.tolist():
        yield f"{name}: the sample index's offsets differ from the shard's members (rebuild: `hippo data index`)"


def _split_index(folder: str, name: str, split: SplitInfo, report: VerifyReport) -> ShardOffsets | None:
    """The split's sample index, or None with the problem reported (missing, damaged)."""
    try:
        return load_index(folder, name, split)
    except ManifestError as e:
        report.problems.append(str(e))
        return None


def verify(folder: str, *, progress: bool = False) -> VerifyReport:
    """Re-read every shard: size, sha256, sample count, that every sample decodes, and the sample index."""
    from tqdm import tqdm

    m = load_manifest(folder)
    report = VerifyReport()
    for name, s in m.splits.items():
        if s.shards:
            try:
                check_against_shards(folder, m, name)
            except ManifestError as e:  # one problem, not one per sample
                report.problems.append(str(e))
                return report
    indexes = {name: _split_index(folder, name, s, report) for name, s in m.splits.items() if s.shards}
    shards = [(name, k, sh) for name, s in m.splits.items() for k, sh in enumerate(s.shards)]
    for name, k, sh in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        report.shards += 1
        report.samples += sh.samples
        index = indexes[name]
        offsets = None if index is None else index.offsets[index.bases[k]:index.bases[k + 1]]
        report.problems.extend(_check_shard(folder, m, sh.name, sh.samples, sh.bytes, sh.sha256, offsets))
    for name, s in m.splits.items():
        if sum(sh.samples for sh in s.shards) != s.samples:
            report.problems.append(f"{name}: shard sample counts do not add up to {s.samples}")
    return report
