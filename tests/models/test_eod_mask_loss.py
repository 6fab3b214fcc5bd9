"""`train.eod_mask_loss` at the model level: the loss leaves out the positions whose input is the EOS."""

from __future__ import annotations

import pytest
import torch

from hippo.pretrain.config import ConfigError, HippoConfig, ModelConfig
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.loss import IGNORE_INDEX, eod_masked_labels, kept_token_losses, mean_kept_loss

EOS = 7
CFG = dict(vocab_size=61, d_model=32, n_layer=3, n_head=4, attn_layer_idx=[1])


def _window(B: int = 3, L: int = 40) -> torch.Tensor:
    """(B, L + 1) tokens with EOS at the first input, two in a row, and the last input."""
    ids = torch.randint(0, 61, (B, L + 1), generator=torch.Generator().manual_seed(3))
    ids[ids == EOS] = EOS + 1
    ids[0, [0, 9, 10, L - 1]] = EOS
    ids[1, [20]] = EOS
    ids[2, [L]] = EOS  # a label only: its position is kept
    return ids


def test_masked_loss_equals_a_float64_hand_computation_without_the_eos_positions():
    torch.manual_seed(0)
    model = HippoLM(ModelConfig(**CFG)).double()
    ids = _window()
    x, y = ids[:, :-1], ids[:, 1:]
    loss = model.loss(x, eod_masked_labels(x, y, EOS))
    with torch.no_grad():
        logp = model(x).double().log_softmax(-1)  # the padded vocabulary too, as the model's loss
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    keep = x != EOS
    assert int((~keep).sum()) == 5
    expected = nll[keep].sum() / keep.sum()
    # The model's cross entropy runs in float32 (`linear._token_cross_entropy`), whatever the weights.
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item(), (loss.item(), expected.item())
    assert abs(loss.item() - nll.mean().item()) > 1e-4  # the masked loss is another number


def test_every_position_kept_is_the_plain_mean_bitwise():
    torch.manual_seed(0)
    model = HippoLM(ModelConfig(**CFG))
    ids = _window()
    with torch.no_grad():
        assert model.loss(ids[:, :-1], ids[:, 1:]) == model.linears.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()


def test_a_cross_entropy_without_an_ignore_index_leaves_the_positions_out_too():
    """The tensor-parallel cross entropy has no ignore index: the left-out labels never reach it, and
    the left-out positions get no gradient."""

    def strict(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert (labels >= 0).all()  # an index of -100 would fail (or read the wrong row)
        return -logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX] * 5])
    per_token = kept_token_losses(strict, logits, labels)
    assert (per_token[labels == IGNORE_INDEX] == 0).all() and (per_token[labels != IGNORE_INDEX] > 0).all()
    mean_kept_loss(strict, logits, labels).backward()
    assert (logits.grad[labels == IGNORE_INDEX] == 0).all()
    # Nothing kept (a window of nothing but EOS): 0, not NaN.
    assert mean_kept_loss(strict, logits.detach()[1:], labels[1:]).item() == 0.0


def test_eod_mask_loss_without_an_eos_id_is_refused_naming_the_option():
    from hippo.pretrain.builders import eod_mask_id

    cfg = HippoConfig()
    assert eod_mask_id(cfg) is None  # off by default: nothing changes
    cfg.train.eod_mask_loss = True
    with pytest.raises(ConfigError, match=r"^train\.eod_mask_loss=true needs .*model\.eos_id"):
        eod_mask_id(cfg)
    assert eod_mask_id(cfg, data_eos_id=5) == 5
    cfg.model.eos_id = 3
    assert eod_mask_id(cfg, data_eos_id=3) == 3
