"""Tokenizers: the built-in byte tokenizer and Hugging Face `tokenizer.json` files.

Nothing is ever downloaded: a spec is `byte`, a path (or URL) to a `tokenizer.json`, or a
prepared data folder (whose manifest names its tokenizer). `train_bpe_tokenizer` trains a
byte-level BPE on the user's own text with the `tokenizers` library.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
    "EOS_CANDIDATES",
]

# Tried in order when a tokenizer.json does not say which token ends a document.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>")


class Tokenizer(ABC):
    """What the pipeline and the trainer need from a tokenizer."""

    spec: str
    """The string that `load_tokenizer` turns back into this tokenizer."""
    name: str
    vocab_size: int
    """Number of ids, EOS included; every id is < vocab_size."""
    eos_id: int
    identity_hash: str
    """Hash of the vocabulary and merges: two tokenizers with the same hash encode alike."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; EOS and out-of-range ids (padded vocabularies) are skipped."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of several documents as arrays (the fast path used by prepare workers)."""
        return [np.asarray(self.encode(t), dtype=np.uint32) for t in texts]

    def identity(self) -> dict:
        """What the manifest records about this tokenizer."""
        return {
            "spec": self.spec,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "hash": self.identity_hash,
        }


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and EOS = 256: no files, works for any text."""

    def __init__(self) -> None:
        self.spec = "byte"
        self.name = "byte"
        self.vocab_size = 257
        self.eos_id = 256
        self.identity_hash = hashlib.sha256(b"hippo-byte-tokenizer-v1").hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Generated text may split a multi-byte character or emit padded-vocab ids: replace, never raise.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer loaded from its JSON (GPT-2, GPT-NeoX, or trained here)."""

    def __init__(self, json_text: str, *, spec: str, name: str, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTok

        self._tok = _HFTok.from_str(json_text)
        self.spec = spec
        self.name = name
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(eos_token)
        canonical = json.dumps(json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"))
        self.identity_hash = hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def _find_eos(self, eos_token: str | None) -> int:
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        for tok in candidates:
            tid = self._tok.token_to_id(tok)
            if tid is not None:
                return tid
        raise ValueError(
            f"tokenizer {self.spec!r} has no end-of-document token among {list(candidates)}; "
            "name one with --eos-token"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def to_json(self) -> str:
        """The tokenizer.json text (what prepare copies next to the shards)."""
        return self._tok.to_str()

    @property
    def eos_token(self) -> str:
        return self._tok.id_to_token(self.eos_id)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) != self.eos_id]
        return self._tok.decode(keep, skip_special_tokens=False)


def identity_label(identity: dict) -> str:
    """"name:hash" of a tokenizer's `identity()` (as manifests and exports record it)."""
    return f"{identity['name']}:{identity['hash']}"


def _name_from_path(path: str) -> str:
    p = Path(path.rstrip("/"))
    # ".../gpt2/tokenizer.json" is better named by its folder than by the generic file name.
    return p.parent.name or p.stem if p.name == "tokenizer.json" else p.stem


def load_tokenizer(spec: str, *, eos_token: str | None = None) -> Tokenizer:
    """Build a tokenizer from `spec`.

    Args:
        spec: `byte`; a path or http(s) URL of a `tokenizer.json`; or a prepared data folder
            (local or URL), whose manifest names the tokenizer it was made with.
        eos_token: for tokenizer.json files, the token that ends a document
            (default: the first of EOS_CANDIDATES the vocabulary has).
    """
    from .remote import is_url, join_url, read_bytes

    if spec == "byte":
        return ByteTokenizer()
    if is_url(spec):
        if spec.endswith(".json") and not spec.endswith("manifest.json"):
            return HFTokenizer(read_bytes(spec).decode(), spec=spec, name=_name_from_path(spec), eos_token=eos_token)
        return _from_dataset(spec, join_url(spec, "manifest.json"), eos_token)
    path = Path(spec)
    if path.is_dir():
        if (path / "manifest.json").exists():
            return _from_dataset(spec, str(path / "manifest.json"), eos_token)
        if (path / "tokenizer.json").exists():
            path = path / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path.read_text(encoding="utf-8"), spec=str(path), name=_name_from_path(str(path)),
                           eos_token=eos_token)
    raise ValueError(
        f"tokenizer {spec!r}: not 'byte', not an existing tokenizer.json, and not a prepared data folder"
    )


def _from_dataset(folder: str, manifest_url: str, eos_token: str | None) -> Tokenizer:
    """The tokenizer a prepared folder was made with (its copy of tokenizer.json, if any)."""
    from .remote import join_url, read_bytes

    info = json.loads(read_bytes(manifest_url))["tokenizer"]
    if info["spec"] == "byte":
        return ByteTokenizer()
    url = join_url(folder, info["file"])
    tok = HFTokenizer(read_bytes(url).decode(), spec=url, name=info["name"], eos_token=eos_token or info.get("eos_token"))
    if tok.identity_hash != info["hash"]:
        raise ValueError(f"{url}: tokenizer hash {tok.identity_hash} != manifest's {info['hash']}")
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str],
    output: Path,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    eos_token: str = "<|endoftext|>",
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on `texts` and save it as `output` (tokenizer.json).

    Byte-level means every string is encodable (the 256 byte symbols are always in the
    vocabulary), so prepare never meets an unknown character.
    """
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be >= 257 (256 byte symbols + EOS), got {vocab_size}")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(output)
    return HFTokenizer(output.read_text(encoding="utf-8"), spec=str(output), name=_name_from_path(str(output)),
                       eos_token=eos_token)
