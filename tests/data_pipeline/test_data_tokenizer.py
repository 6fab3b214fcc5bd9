"""Tokenizers: byte tokenizer contract, BPE training, loading tokenizer.json files."""

from __future__ import annotations

import pytest
from dp_helpers import make_docs
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers

from hippo.data_pipeline.tokenizer import ByteTokenizer, load_tokenizer, train_bpe_tokenizer


def test_byte_tokenizer_round_trip_and_identity():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    text = "héllo 日本語 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert load_tokenizer("byte").identity_hash == tok.identity_hash


def test_byte_decode_tolerates_invalid_utf8_and_skips_eos_and_padded_ids():
    tok = ByteTokenizer()
    # 0xE6 0x97 starts a 3-byte character that never completes; 256 is EOS; 260 is a padded-vocab id.
    assert tok.decode([0x41, 0xE6, 0x97, 256, 0x42, 260, 0xFF]) == "A\ufffdB\ufffd"


def test_trained_bpe_round_trips_and_is_loadable(tmp_path):
    docs = make_docs(200, seed=3)
    tok = train_bpe_tokenizer(iter(docs), tmp_path / "tok" / "tokenizer.json", vocab_size=320)
    assert 257 <= tok.vocab_size <= 320
    assert tok.eos_id == 0  # the special token is added first
    loaded = load_tokenizer(str(tmp_path / "tok" / "tokenizer.json"))
    assert loaded.identity_hash == tok.identity_hash
    assert loaded.name == "tok"
    for d in docs[:20] + ["unseen 🙂 text ñ"]:
        ids = loaded.encode(d)
        assert loaded.eos_id not in ids
        assert loaded.decode(ids) == d
    # Merges were learnt: the corpus' frequent words take fewer ids than bytes.
    assert len(loaded.encode(docs[0])) < len(docs[0].encode())
    other = train_bpe_tokenizer(iter(docs), tmp_path / "other.json", vocab_size=300)
    assert other.identity_hash != tok.identity_hash


def test_load_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        load_tokenizer(str(tmp_path / "nope.json"))
    hf = HFTok(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="--eos-token"):
        load_tokenizer(str(tmp_path / "noeos.json"))
    tok = load_tokenizer(str(tmp_path / "noeos.json"), eos_token="b")
    assert tok.eos_id == 1
