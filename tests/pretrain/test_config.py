"""Config loading: shipped files parse, unknown keys and bad values name the option."""

import pytest

from pretrain.config import CONFIG_DIR, ConfigError, HippoConfig, ModelConfig, from_dict, load_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, HippoConfig)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"model\.d_modle"):
        from_dict(HippoConfig, {"model": {"d_modle": 3}})


def test_bad_values_name_the_option():
    with pytest.raises(ConfigError, match=r"model\.attn_layer_idx"):
        ModelConfig(n_layer=2, attn_layer_idx=[5])
    with pytest.raises(ConfigError, match=r"model\.n_head"):
        ModelConfig(d_model=30, n_head=4, attn_layer_idx=[0])
    with pytest.raises(ConfigError, match=r"model\.mixer"):
        from_dict(HippoConfig, {"model": {"mixer": "mamba"}})
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        from_dict(HippoConfig, {"optim": {"lr": "fast"}})


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("tiny_hybrid", ["model.attn_layer_idx=[0, 2]", "optim.lr=1e-3", "model.d_model=64"])
    assert cfg.model.attn_layer_idx == [0, 2] and cfg.optim.lr == 1e-3 and cfg.model.d_model == 64
    assert cfg.model.layer_mixers == ["attention", "h3", "attention", "h3"]
