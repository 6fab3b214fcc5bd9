"""`train.compile` at the block level (`hippo.parallel.compiled.compile_blocks`): every mixer's
block compiles to one graph per call kind (no graph break), and a compiled block's outputs and
gradients are eager's within 1e-5 (fp32, normwise relative: inductor reassociates sums). A failed
compilation leaves the blocks eager, with one warning naming why.

The compiling test shares one set of compiled blocks (module fixture): CI time is spent once.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hippo.parallel.compiled import compile_blocks
from hippo.pretrain.models import ModelConfig
from hippo.pretrain.models.block import Block

B, L, D = 2, 48, 32
BASE = dict(vocab_size=40, d_model=D, n_layer=2, n_head=4, d_state=8)
# (name, model options, documents): every mixer, and attention's own compiled path for documents
# (the whole same-document mask instead of eager's host-read segments).
CASES = [
    ("h3", dict(mixer="h3"), False),
    ("s4d", dict(mixer="s4d"), False),
    ("attention", dict(mixer="attention"), False),
    ("attention_documents", dict(mixer="attention", document_isolation=True, eos_id=3), True),
]


def _blocks() -> dict[str, tuple[Block, bool]]:
    """Block 0 (not the last: it returns the layer list's tuple with documents) of each case."""
    out = {}
    for name, options, documents in CASES:
        torch.manual_seed(0)
        out[name] = (Block(ModelConfig(**BASE, **options), 0), documents)
    return out


def _step(block: Block, x: torch.Tensor, w: torch.Tensor, doc_start: torch.Tensor | None) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = block(x) if doc_start is None else block((x, doc_start))[0]
    (y * w).sum().backward()
    return [y, x.grad, *(p.grad for p in block.parameters())]


@pytest.fixture(scope="module")
def compiled_blocks():
    """(eager copy, compiled block, documents, its CompileResult) per case, compiled once."""
    torch._dynamo.reset()
    out = {}
    for name, (block, documents) in _blocks().items():
        eager = copy.deepcopy(block)
        result = compile_blocks(block, micro_batch_size=B, chunk_length=L, documents=documents, announce=False)
        out[name] = (eager, block, documents, result)
    return out


@pytest.mark.compile
@pytest.mark.timeout(600)
def test_every_mixers_block_compiles_to_one_graph_and_matches_eager(compiled_blocks):
    """Per block: no graph break while it compiled (training forward + backward, eval forward),
    and one graph for `torch._dynamo.explain`; forward and every gradient within 1e-5 of eager, with
    document boundaries where the block takes them."""
    torch.manual_seed(1)
    x, w = torch.randn(B, L, D), torch.randn(B, L, D)
    starts = torch.zeros(B, L, dtype=torch.bool)
    starts[0, 9], starts[0, 30], starts[1, 17] = True, True, True
    for name, (eager, block, documents, result) in compiled_blocks.items():
        assert result.error is None and result.blocks == 1, (name, result)
        assert result.graph_breaks == 0, (name, result)
        doc = starts if documents else None
        explained = torch._dynamo.explain(eager)(x if doc is None else (x, doc))
        assert explained.graph_break_count == 0 and explained.graph_count == 1, (name, explained.break_reasons)
        assert block.state_dict().keys() == eager.state_dict().keys()
        got, want = _step(block, x, w, doc), _step(eager, x, w, doc)
        # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift common to a
        # query's scores): both sides are rounding noise, each held below 1e-6 of the largest norm.
        zero = 1e-6 * max(t.norm() for t in want)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            if b.norm() <= zero:
                assert a.norm() <= zero, (name, i, a.norm(), zero)
                continue
            err = ((a - b).norm() / b.norm()).item()
            assert err <= 1e-5, (name, i, err)


def test_a_failed_compilation_trains_eager_with_one_warning(monkeypatch, caplog):
    """Forced failures (in `Module.compile` itself, and in the first compiled call): every block
    is left eager, one warning names the cause, and the blocks still compute."""
    cfg = ModelConfig(**BASE, mixer="s4d")
    model = torch.nn.Sequential(Block(cfg, 0), Block(cfg, 1))
    x = torch.randn(1, 8, D)
    want = model(x)

    def fail(*args, **kwargs):
        raise RuntimeError("inductor exploded\nsecond line")

    def lazily_failing(self, *args, **kwargs):  # as `Module.compile` does: the work at the first call
        self._compiled_call_impl = fail

    for replacement in (fail, lazily_failing):
        caplog.clear()
        with monkeypatch.context() as m:
            m.setattr(torch.nn.Module, "compile", replacement)
            with caplog.at_level(logging.WARNING, logger="hippo"):
                result = compile_blocks(model, micro_batch_size=1, chunk_length=8, documents=False)
        assert result.blocks == 0 and result.error == "RuntimeError: inductor exploded"
        assert [r.getMessage() for r in caplog.records] == [
            "train.compile: compiling the blocks failed (RuntimeError: inductor exploded); training eager"]
        assert all(b._compiled_call_impl is None for b in model)
        assert torch.equal(model(x), want)
