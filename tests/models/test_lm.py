"""The language model: conv vs recurrent mode, prefill + step, causality, init, groups."""

import math

import pytest
import torch

from hippo.kernels import shift_kernel
from hippo.pretrain.config import ModelConfig, OptimConfig
from hippo.pretrain.models import H3, HippoLM, InferenceParams, count_parameters
from hippo.pretrain.models.generation import SamplingConfig, generate, sample_next
from hippo.pretrain.optim import lr_multiplier, parameter_groups

TINY = dict(vocab_size=61, d_model=32, n_layer=3, n_head=4, d_state=64)
VARIANTS = {
    "h3": dict(TINY),
    "hybrid": dict(TINY, attn_layer_idx=[1]),
    "s4d": dict(TINY, mixer="s4d"),
    "transformer_rotary": dict(TINY, mixer="attention", position_embedding="rotary"),
    "transformer_learned": dict(TINY, mixer="attention", position_embedding="learned", max_position_embeddings=256),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    return HippoLM(ModelConfig(**VARIANTS[name])).eval()


def _stepwise_logits(model, ids, prefill):
    """Prefill the first `prefill` tokens by convolution, then feed the rest one at a time."""
    B, L = ids.shape
    params = InferenceParams(max_seqlen=L, max_batch_size=B)
    out = [model(ids[:, :prefill], params)]
    for t in range(prefill, L):
        params.seqlen_offset = t
        out.append(model(ids[:, t : t + 1], params))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_recurrent_mode_matches_full_pass(name):
    model = _model(name)
    ids = torch.randint(0, 61, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        for prefill in (1, 40, 64, 100):  # token by token, and prompts <, =, > d_state
            stepped = _stepwise_logits(model, ids, prefill)
            err = (stepped - full).abs().max().item()
            assert err <= 1e-4, (name, prefill, err)


@pytest.mark.parametrize("name", ["h3", "hybrid", "s4d", "transformer_rotary"])
def test_causality(name):
    model = _model(name)
    L = 80
    h = torch.randn(1, L, 32, requires_grad=True)
    out = model.trunk(h)
    w = torch.randn(32)  # a plain sum of a LayerNorm output is identically 0
    for i in (0, 31, 63, 78):
        (grad,) = torch.autograd.grad((out[0, i] * w).sum(), h, retain_graph=True)
        past = grad[0, : i + 1].abs().max().item()
        assert past > 0
        # FFT round-off spreads ~1e-11 into the future; a real leak would be O(past).
        assert grad[0, i + 1 :].abs().max().item() <= 1e-6 * past


def test_h3_layer_parameter_count_formula():
    for d in (32, 768):
        layer = H3(d, 64, layer_idx=0)
        assert sum(p.numel() for p in layer.parameters()) == 4 * d * d + 327 * d


@pytest.mark.parametrize(
    "size,expected",
    [((768, 12, 12, [1, 8]), 126.14e6), ((1024, 24, 16, [1, 13]), 361.06e6),
     ((2048, 24, 16, [1, 13]), 1.326e9), ((2560, 32, 20, [10, 21]), 2.671e9)],
)
def test_paper_hybrid_parameter_counts(size, expected):
    d, n, h, attn = size
    n_params = count_parameters(ModelConfig(d_model=d, n_layer=n, n_head=h, attn_layer_idx=attn))
    assert abs(n_params - expected) / expected < 0.005


def test_shipped_paper_configs_count_within_half_percent():
    from hippo.pretrain.config import load_yaml, from_dict

    expected = {"hybrid_125m": 126.14e6, "hybrid_355m": 361.06e6, "hybrid_1.3b": 1.326e9, "hybrid_2.7b": 2.671e9}
    for name, n in expected.items():
        cfg = from_dict(ModelConfig, load_yaml(name)["model"], "model")
        assert abs(count_parameters(cfg) - n) / n < 0.005, name


def test_init_statistics_and_tied_head():
    cfg = ModelConfig(vocab_size=1000, d_model=256, n_layer=4, n_head=4, attn_layer_idx=[1])
    model = HippoLM(cfg)
    assert model.embedding.word.weight.std().item() == pytest.approx(0.02, rel=0.05)
    fc2 = model.layers["0"].mlp.fc2.weight
    assert fc2.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.layers["1"].mixer.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.layers["0"].mixer.out_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers["0"].mixer.q_proj.bias.abs().max().item() == 0
    h3 = model.layers["0"].mixer
    sh = h3.shift_ssm
    torch.testing.assert_close(shift_kernel(sh.B, sh.C, sh.B.shape[-1]), sh.C)  # B = e1 at init
    # no separate LM head parameter
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert cfg.padded_vocab_size == 1000 and ModelConfig(vocab_size=50257).padded_vocab_size == 50264


def test_init_depends_on_seed_and_name_only():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, attn_layer_idx=[1])
    torch.manual_seed(123)  # the global RNG plays no part
    a, b, c = HippoLM(cfg, seed=7), HippoLM(cfg, seed=7), HippoLM(cfg, seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        drawn = name.endswith((".C", ".D", ".log_dt")) or (name.endswith("weight") and "norm" not in name)
        if drawn:
            assert not torch.equal(pa, pc), name
    # two layers of the same kind draw different weights
    assert not torch.equal(a.layers["0"].mlp.fc1.weight, a.layers["1"].mlp.fc1.weight)


def test_parameter_groups_follow_paper_rule():
    model = _model("hybrid")
    cfg = OptimConfig(lr=6e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert groups["ssm"]["lr"] == 1e-3 and groups["ssm"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    ssm_names = {n for n, p in model.named_parameters() if any(p is q for q in groups["ssm"]["params"])}
    per_layer = {n.split(".", 2)[2] for n in ssm_names}
    assert per_layer == {
        "mixer.shift_ssm.B", "mixer.diag_ssm.log_dt", "mixer.diag_ssm.log_A_real",
        "mixer.diag_ssm.A_imag", "mixer.diag_ssm.B",
    }
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert parameter_groups(model, OptimConfig(lr=2e-4))[-1]["lr"] == 2e-4


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1)
    m = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[9:], m[10:]))
    assert lr_multiplier(100, 100, cfg) == pytest.approx(0.1)


def test_generation_greedy_matches_argmax_of_full_pass():
    model = _model("hybrid")
    prompt = torch.randint(0, 61, (2, 70), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, 10, SamplingConfig(greedy=True), vocab_size=61)
    assert out.shape == (2, 80) and torch.equal(out[:, :70], prompt)
    with torch.no_grad():
        logits = model(out)[:, 69:-1, :61]
        # the prefill asks for the last position's logits only
        torch.testing.assert_close(model(prompt, last_only=True), model(prompt)[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.argmax(-1), out[:, 70:])


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, SamplingConfig(top_k=2), g).tolist()) == {0, 1}
    # p = softmax: [0.636, 0.234, 0.086, ...]; top_p 0.8 keeps the first two tokens
    assert set(sample_next(logits, SamplingConfig(top_p=0.8), g).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingConfig(top_p=0.5), g).tolist()) == {0}
    hot = sample_next(logits, SamplingConfig(temperature=100.0), g)
    assert len(set(hot.tolist())) == 5
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0)


# ------------------------------------------------------------------ model.conv_impl (issue 13)
def test_conv_impl_config_is_validated():
    from hippo.pretrain.models.config import ConfigError

    for name in ("auto", "triton", "chunked", "reference"):
        assert ModelConfig(**TINY, conv_impl=name).conv_impl == name
    with pytest.raises(ConfigError, match="model.conv_impl must be one of"):
        ModelConfig(**TINY, conv_impl="torch")  # the kernels' name for chunked, not a config value


@pytest.mark.parametrize("name,kernel_impl", [("auto", "auto"), ("chunked", "torch"), ("reference", "reference")])
def test_h3_conv_impl_selects_the_kernel_path(monkeypatch, name, kernel_impl):
    """H3(conv_impl=...) hands h3_core the kernels' name of the path, and every path agrees."""
    import hippo.pretrain.models.h3 as h3_module

    seen = []
    real = h3_module.h3_core

    def spy(*args, impl, **kw):
        seen.append(impl)
        return real(*args, impl=impl, **kw)

    monkeypatch.setattr(h3_module, "h3_core", spy)
    torch.manual_seed(0)
    layer = H3(32, 64, layer_idx=0, conv_impl=name)
    u = torch.randn(2, 100, 32)
    y = layer(u)
    assert seen == [kernel_impl]
    layer.conv_impl = "reference"
    torch.testing.assert_close(y, layer(u), rtol=2e-4, atol=2e-5)


def test_h3_rejects_an_unknown_conv_impl():
    from hippo.pretrain.models.config import ConfigError

    with pytest.raises(ConfigError, match="model.conv_impl"):
        H3(32, 64, layer_idx=0, conv_impl="torch")


def test_h3_explicit_triton_that_cannot_run_names_the_config_option(monkeypatch):
    from hippo.pretrain.models.config import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = H3(32, 64, layer_idx=0, conv_impl="triton")
    with pytest.raises(ConfigError, match=r"model\.conv_impl='triton' cannot run here: .*not CUDA"):
        layer(torch.randn(1, 16, 32))


def test_model_config_conv_impl_reaches_every_h3_layer():
    model = HippoLM(ModelConfig(**TINY, conv_impl="reference"))
    impls = [m.conv_impl for m in model.modules() if isinstance(m, H3)]
    assert impls and set(impls) == {"reference"}
