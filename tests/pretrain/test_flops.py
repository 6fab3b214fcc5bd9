"""Model FLOPs per token against an independent count: 2 FLOPs per weight of every matmul, read
off the model itself, plus the sequence-mixing terms the formula documents."""

import math

import pytest
import torch
import torch.nn as nn

from hippo.pretrain.config import ModelConfig
from hippo.pretrain.flops import fft_conv_flops_per_token, forward_flops_per_token, train_flops_per_token
from hippo.pretrain.models import HippoLM


def _matmul_flops(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = HippoLM(cfg, init=False)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 2 * (linear + model.embedding.word.weight.numel())  # + the tied head


@pytest.mark.parametrize("mixer,attn", [("attention", []), ("h3", []), ("h3", [1, 8])])
def test_forward_flops_are_matmuls_plus_sequence_mixing(mixer, attn):
    cfg = ModelConfig(d_model=768, n_layer=12, n_head=12, mixer=mixer, attn_layer_idx=attn)
    L, d = 2048, cfg.d_model
    n_attn = sum(k == "attention" for k in cfg.layer_mixers)
    n_h3 = cfg.n_layer - n_attn
    mixing = n_attn * 2 * L * d + n_h3 * (2 * d * fft_conv_flops_per_token(L) + 6 * d)
    assert forward_flops_per_token(cfg, L) == pytest.approx(_matmul_flops(cfg) + mixing, rel=1e-12)
    assert train_flops_per_token(cfg, L) == 3 * forward_flops_per_token(cfg, L)


def test_fft_conv_cost_grows_like_log_length():
    # rfft + irfft of size 2L at 2.5 n log2 n each, plus the spectral product, per token
    assert fft_conv_flops_per_token(1024) == pytest.approx(10 * math.log2(2048) + 6 * 1025 / 1024)
