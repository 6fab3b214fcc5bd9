"""Fixtures for the data pipeline tests: small prepared folders shared by the whole session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dp_helpers
from dp_helpers import ROOT, make_docs, write_jsonl  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hippo.data_pipeline.prepare import prepare  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """One prepared folder (byte tokenizer, seq_len 32, ~45 shards) and its documents."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(600, seed=1)
    src = write_jsonl(root / "docs.jsonl", docs, ["A", "B", "C"])
    prepare([src], root / "prepared", tokenizer="byte", seq_len=32, shard_bytes=40_000, progress=False)
    return root / "prepared", docs


@pytest.fixture(scope="session")
def second_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A second, smaller prepared folder with the same tokenizer and seq_len (for mixtures)."""
    root = tmp_path_factory.mktemp("corpus2")
    docs = make_docs(150, seed=2)
    src = write_jsonl(root / "docs2.jsonl", docs, ["D"])
    prepare([src], root / "prepared", tokenizer="byte", seq_len=32, shard_bytes=20_000, progress=False)
    return root / "prepared", docs
