"""Layouts that cannot run are refused before any process starts, naming the option."""

import pytest

from hippo.parallel.pipeline import stage_bounds
from hippo.pretrain.config import ConfigError, HippoConfig, load_config


def _cfg(*overrides: str) -> HippoConfig:
    return load_config("tiny_hybrid", list(overrides))


def test_valid_layout_derives_data_parallel_and_accumulation():
    layout = _cfg("parallel.tensor=2", "parallel.pipeline=2", "train.micro_batch_size=2", "train.global_batch_size=16").layout(8)
    assert (layout.tensor, layout.pipeline, layout.data) == (2, 2, 2)
    assert layout.grad_accum_steps == 4 and layout.global_batch_size == 16


@pytest.mark.parametrize(
    "overrides,world,option",
    [
        (["parallel.tensor=2", "parallel.pipeline=2"], 6, "parallel.tensor x parallel.pipeline"),
        (["parallel.tensor=3"], 3, "model.d_model"),
        (["parallel.tensor=8", "model.d_model=256"], 8, "model.n_head"),
        (["parallel.tensor=2", "model.vocab_size=255", "model.pad_vocab_multiple=1"], 2, "model.pad_vocab_multiple"),
        (["parallel.pipeline=8"], 8, "model.n_layer"),
        (["parallel.pipeline=2", "parallel.stage_layers=[1, 2]"], 2, "parallel.stage_layers"),
        (["train.global_batch_size=6", "train.micro_batch_size=2"], 2, "train.global_batch_size"),
        (["parallel.tensor=2", "model.mixer=s4d", "model.attn_layer_idx=[]"], 2, "model.mixer=s4d"),
        (["parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel needs parallel.tensor"),
        (["parallel.sequence_parallel=true", "parallel.tensor=2", "train.seq_len=255"], 2, "train.seq_len=255"),
    ],
)
def test_inconsistent_layout_is_refused_naming_the_option(overrides, world, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        _cfg(*overrides).layout(world)


def test_zero_stage_checks_happen_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage=2 with parallel\.pipeline=2"):
        _cfg("parallel.pipeline=2", "parallel.zero_stage=2")
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage=3 is not supported"):
        _cfg("parallel.zero_stage=3")


def _stage_bounds(*overrides: str) -> list[int]:
    cfg = _cfg(*overrides)
    return stage_bounds(cfg.model, cfg.layout(cfg.parallel.pipeline))


def test_stage_bounds_explicit_uniform_and_balanced():
    # layer list: embedding, 4 blocks, final norm, head = 7 layers
    assert _stage_bounds("parallel.pipeline=2", "parallel.stage_layers=[1, 3]") == [0, 2, 7]
    assert _stage_bounds("parallel.pipeline=2", "parallel.pipeline_partition=uniform") == [0, 4, 7]
    balanced = _stage_bounds("parallel.pipeline=2")
    assert balanced[0] == 0 and balanced[-1] == 7 and 1 < balanced[1] < 6


def test_memory_estimate_counts_the_single_process_model_and_splits_by_tensor_parallel():
    from hippo.parallel.memory import rank_memory, stage_parameter_counts
    from hippo.pretrain.models import count_parameters

    cfg = load_config("hybrid_1.3b")
    assert stage_parameter_counts(cfg.model, cfg.layout(1)) == [count_parameters(cfg.model)]
    tp4 = load_config("hybrid_1.3b", ["parallel.tensor=4"])
    replicated = cfg.model.n_layer * (2 * 2 + 2) * cfg.model.d_model + 2 * cfg.model.d_model  # LNs, row biases, norm_f
    assert stage_parameter_counts(tp4.model, tp4.layout(4))[0] == (count_parameters(cfg.model) - replicated) // 4 + replicated
    zero2 = load_config("hybrid_1.3b", ["train.precision=bf16", "parallel.zero_stage=2"])
    mem = rank_memory(zero2.model, zero2.layout(8), precision=zero2.train.precision)
    assert mem.weight_bytes == 2 * mem.parameters and mem.gradient_bytes == 2 * mem.parameters // 8
    assert mem.optimizer_bytes == 12 * mem.parameters // 8
