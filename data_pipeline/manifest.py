"""The manifest of a prepared folder: what was made, from what, with which tokenizer.

`manifest.json` lists each split's shards (samples, bytes, sha256), the tokenizer identity,
seq_len and dtype, every source file with its per-source token counts (and the Pile's
`pile_set_name` subsets), and skipped records per reason with examples. It is written
atomically (temp file + rename), last, so its presence means the folder is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ManifestError, MissingSplitError
from .shard_io import ShardInfo, sample_extension

__all__ = ["SplitInfo", "Manifest", "MANIFEST_NAME", "FORMAT_VERSION", "load_manifest", "write_json_atomic",
           "check_against_shards"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class SplitInfo:
    """One split (train / validation) of a prepared folder."""

    shards: list[ShardInfo] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    """Real tokens written (EOS included, final padding excluded)."""
    pad_tokens: int = 0
    """EOS tokens added to fill the split's last window."""
    documents: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    """Input file -> {"documents", "tokens"}."""
    set_names: dict[str, dict[str, int]] = field(default_factory=dict)
    """`meta.pile_set_name` (or "(none)") -> {"documents", "tokens"}."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> bad records skipped (see sources.SKIP_REASONS)."""
    skipped_examples: list[dict] = field(default_factory=list)
    """The first few skipped records as {"file", "line", "reason", "detail"}."""
    index: dict | None = None
    """{"name", "bytes", "sha256"} of the split's sample index (`sample_index`); None in folders
    prepared before it existed (`hippo data index DIR` adds it)."""

    @classmethod
    def from_dict(cls, d: dict) -> SplitInfo:
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)


@dataclass
class Manifest:
    """Everything a reader needs to stream a prepared folder, and its provenance."""

    seq_len: int
    dtype: str
    tokenizer: dict
    """{"spec", "name", "vocab_size", "eos_id", "hash"} and, for tokenizer.json files, "file", "eos_token"."""
    splits: dict[str, SplitInfo]
    inputs: list[dict]
    """Per input file: {"path", "bytes", "split", "info"?}; "info" comes from a `<input>.source.json` sidecar."""
    prepare_args: dict
    version: int = FORMAT_VERSION
    format: str = "hippo-token-shards"

    @property
    def window(self) -> int:
        return self.seq_len + 1

    def skipped(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for split in self.splits.values():
            for reason, n in split.skipped.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits or not self.splits[name].shards:
            have = [k for k, v in self.splits.items() if v.shards]
            raise MissingSplitError(f"split {name!r} has no shards in this folder (splits with data: {have})")
        return self.splits[name]

    def content_hash(self, split: str) -> str:
        """Identity of what a stream of `split` reads: changes if any shard, the tokenizer or seq_len does."""
        s = self.split(split)
        key = {
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "tokenizer": self.tokenizer["hash"],
            "shards": [[sh.name, sh.samples, sh.sha256] for sh in s.shards],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format") != "hippo-token-shards":
            raise ManifestError(f"not a Hippo manifest (format={d.get('format')!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ManifestError(f"manifest version {d.get('version')} is not supported (expected {FORMAT_VERSION})")
        d = dict(d)
        d["splits"] = {k: SplitInfo.from_dict(v) for k, v in d["splits"].items()}
        return cls(**d)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(folder: str) -> Manifest:
    """The manifest of a prepared folder (local path or URL prefix)."""
    from .remote import join_url, read_bytes

    url = join_url(folder, MANIFEST_NAME)
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {MANIFEST_NAME}; run `hippo data prepare` (or it did not finish)") from None
    try:
        return Manifest.from_dict(json.loads(data))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ManifestError(f"{url}: unreadable manifest: {e}") from None


_SAMPLE_DTYPES = {sample_extension(d): d for d in ("uint16", "uint32")}


def _first_window(url: str, size: int) -> tuple[int, str] | None:
    """(decompressed bytes, dtype by extension) of a shard's first sample; None if unreadable."""
    import zstandard

    from .remote import open_url
    from .shard_io import CorruptSample, iter_shard_members

    try:
        f = open_url(url, expected_size=size)
    except FileNotFoundError as e:
        raise ManifestError(f"{url}: shard listed in the manifest is missing ({e}); "
                            "run `hippo data verify` on the folder") from None
    try:
        for _, name, data, _ in iter_shard_members(f, url):
            dtype = _SAMPLE_DTYPES.get(name.split(".", 1)[-1])
            if dtype is None:
                return None
            try:
                return len(zstandard.ZstdDecompressor().decompress(data)), dtype
            except zstandard.ZstdError:
                return None  # damage, not a mismatch: the stream replaces and budgets it
        return None
    except CorruptSample:
        return None
    finally:
        try:
            f.close()
        except OSError:
            pass  # an abandoned `pipe:` command may report SIGPIPE


def check_against_shards(folder: str, m: Manifest, split: str) -> None:
    """Refuse a manifest whose seq_len or dtype its shards do not have, from one sample (cheap).

    A mismatched manifest would otherwise make every sample "unreadable"; a damaged first
    sample is left to the stream's corruption handling.

    Raises:
        ManifestError naming the folder, both windows and what to do.
    """
    from .remote import join_url

    shard = m.split(split).shards[0]
    found = _first_window(join_url(folder, shard.name), shard.bytes)
    if found is None:
        return
    nbytes, dtype = found
    itemsize = 2 if dtype == "uint16" else 4
    if dtype == m.dtype and nbytes == m.window * itemsize:
        return
    tokens, odd = divmod(nbytes, itemsize)
    fits = not odd and tokens > 1
    theirs = f"seq_len={tokens - 1} ({dtype})" if fits else f"{nbytes}-byte {dtype} windows"
    raise ManifestError(
        f"{folder}: manifest.json says seq_len={m.seq_len} ({m.dtype}) but its shards hold {theirs} "
        f"(first sample of {shard.name}); manifest and shards come from different prepare runs: re-run "
        f"`hippo data prepare --overwrite -o {folder}` with the --seq-len you train at"
        + (f" (these shards fit train.seq_len={tokens - 1})" if fits else "")
    )
