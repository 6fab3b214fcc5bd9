"""Helpers for the data pipeline tests: synthetic documents and an independent shard reader.

`read_shard_samples` uses only `tarfile` and `zstandard`, not the package's readers, so tests
compare the pipeline against a reference that does not share its code. (A uniquely named module,
not conftest.py, so that `import` cannot pick up another folder's conftest.)
"""

from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


_WORDS = ["the", "state", "space", "model", "héllo", "wörld", "日本語", "🙂", "x", "tokens", "\n", "  ", "ünïcode"]


def make_docs(n: int, seed: int = 0, *, long_every: int = 37) -> list[str]:
    """Documents of varied length (some span many windows), with multi-byte characters."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(1, 40) if i % long_every else rng.randint(200, 400)
        docs.append(f"doc{i}: " + " ".join(rng.choice(_WORDS) for _ in range(k)))
    return docs


def write_jsonl(path: Path, docs: list[str], set_names: list[str] | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            rec = {"text": text}
            if set_names is not None:
                rec["meta"] = {"pile_set_name": set_names[i % len(set_names)]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def read_shard_samples(path: Path, dtype=np.uint16) -> list[np.ndarray]:
    """Every sample of one shard, in member order (independent of data_pipeline)."""
    out = []
    dctx = zstandard.ZstdDecompressor()
    with tarfile.open(path) as tf:
        for member in tf:
            data = tf.extractfile(member).read()
            out.append(np.frombuffer(dctx.decompress(data), dtype=dtype))
    return out


def read_split(folder: Path, split: str = "train") -> list[list[np.ndarray]]:
    """All samples of a split, per shard, in manifest order."""
    m = json.loads((folder / "manifest.json").read_text())
    dtype = np.dtype(m["dtype"])
    return [read_shard_samples(folder / sh["name"], dtype) for sh in m["splits"][split]["shards"]]


def byte_docs_from_tokens(tokens: np.ndarray, eos: int = 256) -> list[str]:
    """Split a byte-tokenizer id stream at EOS into documents (padding EOS gives empty pieces)."""
    docs, start = [], 0
    ids = tokens.tolist()
    for i, t in enumerate(ids):
        if t == eos:
            if i > start:
                docs.append(bytes(ids[start:i]).decode("utf-8"))
            start = i + 1
    assert start == len(ids), "stream does not end with EOS"
    return docs
