"""The activation estimator's per-token coefficients are what autograd really saves.

Measured here with saved-tensor hooks on the model code (slopes between two lengths, so fixed
per-call tensors drop out): a change to a layer that changes what it saves fails this test until
`parallel.memory` is updated.
"""

from __future__ import annotations

import pytest
import torch

from hippo.parallel.memory import (
    BLOCK_SAVED_BYTES,
    HEAD_SAVED_BYTES_PER_CHANNEL,
    HEAD_SAVED_BYTES_PER_VOCAB,
    activation_bytes,
)
from hippo.pretrain.config import load_config
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.block import Block
from hippo.pretrain.models.config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    own = {p.untyped_storage().data_ptr() for p in params}
    return sum(n for ptr, n in seen.items() if ptr not in own)


def per_token(make, lengths=(512, 1024), batch=2) -> float:
    a, b = (make(L, batch) for L in lengths)
    return (b - a) / (batch * (lengths[1] - lengths[0]))


@pytest.mark.parametrize("mixer,precision", sorted(BLOCK_SAVED_BYTES))
def test_block_coefficients_are_measured_ones(mixer, precision):
    torch.manual_seed(0)
    d, dtype = 64, DTYPES[precision]
    cfg = ModelConfig(vocab_size=64, d_model=d, n_layer=1, n_head=4, mixer="h3" if mixer == "attention" else mixer,
                      attn_layer_idx=[0] if mixer == "attention" else [])
    block = Block(cfg, 0).to(dtype)

    def make(L, B):
        x = torch.randn(B, L, d, dtype=dtype, requires_grad=True)
        return saved_bytes(lambda: block(x), block.parameters())

    assert per_token(make) / d == pytest.approx(BLOCK_SAVED_BYTES[(mixer, precision)], rel=0.03)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_head_coefficients_are_measured_ones(precision):
    d, dtype = 64, DTYPES[precision]

    def head_bytes(vocab):
        model = HippoLM(ModelConfig(vocab_size=vocab, d_model=d, n_layer=1), seed=0).to(dtype)
        model.layers = torch.nn.ModuleDict()  # embedding, final norm, head and loss only

        def make(L, B):
            ids = torch.randint(0, vocab, (B, L))
            return saved_bytes(lambda: model.loss(ids, ids), model.parameters())

        return per_token(make)

    small, big = head_bytes(512), head_bytes(1024)
    assert (big - small) / 512 == pytest.approx(HEAD_SAVED_BYTES_PER_VOCAB, rel=0.03)
    assert (small - 512 * HEAD_SAVED_BYTES_PER_VOCAB) / d == pytest.approx(HEAD_SAVED_BYTES_PER_CHANNEL[precision], rel=0.1)


def test_context_parallelism_divides_what_a_rank_saves_except_gathered_keys():
    def acts(*sets, world=1):
        cfg = load_config("hybrid_1.3b", ["train.micro_batch_size=1", "train.global_batch_size=1", *sets])
        return activation_bytes(cfg.model, cfg.layout(world), cfg.train.seq_len, precision="bf16")

    h3_only = ["model.attn_layer_idx=[]"]
    assert acts(*h3_only, "parallel.context=4", world=4) == acts(*h3_only) // 4
    hybrid_cp4 = acts("parallel.context=4", world=4)
    assert acts() // 4 < hybrid_cp4 < acts() // 2  # two attention layers keep the whole K and V
    assert acts("parallel.activation_checkpointing=true") < acts() // 4
