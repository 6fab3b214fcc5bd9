"""Model FLOPs per token for MFU: what the model computes, not what a kernel happens to do.

Forward FLOPs per token (multiply-add = 2 FLOPs), training = 3x forward (backward ~2x):
- H3 layer: Q, K, V, out projections 8 d^2; two causal FFT convolutions per channel (shift and
  diagonal SSM), each a real FFT and an inverse of size 2L (2.5 n log2 n each) plus the spectral
  product (6 per frequency), per token 10 log2(2L) + 6; element-wise products and skips 6 d.
- Attention layer: projections 8 d^2; scores and weighted values 2 x 2 L d, halved for the causal
  mask (positions attend to L/2 others on average).
- MLP: 2 x 2 x d x (mlp_ratio d). LM head: 2 d V. Embedding lookup and norms: negligible.
The S4D baseline counts as H3's diagonal convolution plus its 2d -> 4d^2 GLU projection.
"""

from __future__ import annotations

import math

from hippo.pretrain.models.config import ModelConfig


def fft_conv_flops_per_token(seq_len: int) -> float:
    n = 2 * seq_len
    return (2 * 2.5 * n * math.log2(n) + 6 * (seq_len + 1)) / seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d = cfg.d_model
    conv = fft_conv_flops_per_token(seq_len)
    mixer = {
        "h3": 8 * d * d + 2 * d * conv + 6 * d,
        "s4d": 2 * d * 2 * d + d * conv + 4 * d,
        "attention": 8 * d * d + 2 * seq_len * d,
    }
    mlp = 4 * d * cfg.mlp_ratio * d
    layers = sum(mixer[kind] + mlp for kind in cfg.layer_mixers)
    return layers + 2 * d * cfg.padded_vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len)
