"""Config loading: shipped files parse, unknown keys and bad values name the option."""

import dataclasses
from typing import Optional

import pytest

from hippo.pretrain.config import (CONFIG_DIR, ConfigError, HippoConfig, ModelConfig, from_dict, load_config,
                                   resume_changes, to_dict)


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


@dataclasses.dataclass(kw_only=True)
class _Annotated:
    """One field per annotation kind the config sections use whose coercion no test above pins
    (Literal choices and "1e-3"-style strings are pinned by the tests above)."""

    uri: Optional[str] = None
    epochs: int | None = None
    weights: list[float] | None = None
    stage_layers: list[int] = dataclasses.field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.999)
    lr: float = 6e-4


@pytest.mark.parametrize("field,value,expected", [
    ("uri", None, None),
    ("uri", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("epochs", None, None),
    ("epochs", 3, 3),
    ("weights", [1, 0.5], [1.0, 0.5]),  # Optional[list[float]]: the items are still coerced
    ("stage_layers", [2, 1], [2, 1]),
    ("stage_layers", (2, 1), [2, 1]),  # a tuple becomes the annotated list
    ("betas", [0.9, 1], (0.9, 1.0)),  # YAML lists become tuples, ints become floats
    ("lr", 1, 1.0),
])
def test_from_dict_coerces_annotated_types(field, value, expected):
    got = getattr(from_dict(_Annotated, {field: value}, "sec"), field)
    assert got == expected and type(got) is type(expected)
    if isinstance(expected, (list, tuple)):
        assert [type(x) for x in got] == [type(x) for x in expected]


@pytest.mark.parametrize("field,value,message", [
    ("uri", 3, r"sec\.uri must be str, got 3"),  # Optional[X]: X's own error, naming the option
    ("epochs", "3", r"sec\.epochs must be int, got '3'"),
    ("epochs", True, r"sec\.epochs must be int, got True"),  # a bool is not an int
    ("weights", [1, "a"], r"sec\.weights\[1\] must be float"),
    ("stage_layers", 4, r"sec\.stage_layers must be a list, got 4"),
    ("stage_layers", [1, "2"], r"sec\.stage_layers\[1\] must be int, got '2'"),
    ("stage_layers", [1.0], r"sec\.stage_layers\[0\] must be int, got 1\.0"),
    ("betas", [0.9, "x"], r"sec\.betas\[1\] must be float, got 'x'"),
    ("lr", True, r"sec\.lr must be float, got True"),
    ("lr", None, r"sec\.lr must be float, got None"),
])
def test_from_dict_refuses_values_that_do_not_fit_the_annotation(field, value, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(_Annotated, {field: value}, "sec")


def test_yaml_values_are_coerced_in_the_shipped_sections():
    # PyYAML (YAML 1.1) reads 6e-4 as the string "6e-4"; from_dict must still give a float.
    cfg = from_dict(HippoConfig, {"optim": {"lr": "6e-4", "betas": [0.9, 1]}, "train": {"precision": "bf16"},
                                  "tracking": {"tracking_uri": None}})
    assert cfg.optim.lr == 6e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (0.9, 1.0) and all(type(b) is float for b in cfg.optim.betas)
    assert cfg.train.precision == "bf16" and cfg.tracking.tracking_uri is None


def test_a_fixed_length_tuple_option_refuses_another_length():
    with pytest.raises(ConfigError, match=r"optim\.betas must have 2 items"):
        from_dict(HippoConfig, {"optim": {"betas": [0.9, 0.99, 0.5]}})


# The paper's training recipe (Fu et al. 2023, "Hungry Hungry Hippos"; the H3 reference notes):
# sequences of 2048 tokens, bf16, ~420B Pile tokens, global batch per model size.
PAPER_SEQ_LEN = 2048
PAPER_TOKENS = 420e9
PAPER_GLOBAL_BATCH = {"125m": 256, "355m": 256, "1.3b": 512, "2.7b": 512}
PAPER_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("tiny_"))
TINY_CONFIGS = sorted(CONFIG_DIR.glob("tiny_*.yaml"))
QUICKSTART_SEQ_LEN = 256
"""`hippo quickstart` prepares its corpus with the byte tokenizer at this length (README)."""


def test_every_paper_size_has_a_shipped_config():
    sizes = sorted({p.stem.split("_", 1)[1] for p in PAPER_CONFIGS})
    assert sizes == sorted(PAPER_GLOBAL_BATCH) and len(PAPER_CONFIGS) == 3 * len(PAPER_GLOBAL_BATCH)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_carry_the_papers_training_recipe(path):
    from hippo.pretrain.optim import lr_multiplier

    cfg = load_config(path)
    t, o = cfg.train, cfg.optim
    assert t.seq_len == PAPER_SEQ_LEN and t.precision == "bf16"
    assert t.global_batch_size == PAPER_GLOBAL_BATCH[path.stem.split("_", 1)[1]]
    tokens = t.steps * t.global_batch_size * t.seq_len
    assert abs(tokens / PAPER_TOKENS - 1) <= 0.05, f"{tokens / 1e9:.1f}B tokens"
    # Linear warmup over 1% of the steps, then cosine down to 0.1 x lr at the last step.
    warmup = round(0.01 * t.steps)
    assert lr_multiplier(0, t.steps, o) == pytest.approx(1 / warmup)
    assert lr_multiplier(warmup - 1, t.steps, o) == 1.0
    assert lr_multiplier(warmup + (t.steps - warmup) // 2, t.steps, o) == pytest.approx(0.55, abs=1e-3)
    assert lr_multiplier(t.steps - 1, t.steps, o) == pytest.approx(0.1, abs=1e-6)
    # Checkpoints and evaluations every 0.1%..1% of the run: hours apart, not minutes or days.
    for interval in (cfg.checkpoint.interval, t.eval_interval):
        assert 100 <= t.steps / interval <= 1000, interval


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_run_on_one_node_of_eight_gpus(path):
    """The batch splits over 8 data-parallel ranks (micro batch x accumulation x 8)."""
    cfg = load_config(path, ["data.paths=[/shared/pile]"])
    layout = cfg.layout(8)
    assert layout.global_batch_size == cfg.train.global_batch_size and layout.grad_accum_steps >= 1


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tiny_configs_train_on_the_quickstarts_data(path):
    from hippo.data_pipeline.tokenizer import load_tokenizer

    cfg = load_config(path, ["data.paths=[/tmp/quickstart/data]"])
    assert cfg.train.seq_len == QUICKSTART_SEQ_LEN
    assert cfg.model.vocab_size == load_tokenizer("byte").vocab_size
    assert cfg.layout(1).global_batch_size == cfg.train.global_batch_size


@pytest.mark.parametrize("overrides,world,message", [
    (["train.seq_len=30", "parallel.context=4"], 4, r"train\.seq_len=30 is not divisible by parallel\.context=4"),
    (["parallel.context=4"], 6, r"world size 6 is not divisible by .*parallel\.context = 1 x 1 x 4"),
    (["parallel.context=2", "model.dropout=0.1"], 2, r"model\.dropout=0\.1 with parallel\.context=2"),
    (["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true"], 4,
     r"parallel\.sequence_parallel with parallel\.context"),
    (["parallel.context=0"], 1, r"parallel\.context must be >= 1"),
])
def test_context_parallel_layouts_that_cannot_run_are_refused(overrides, world, message):
    from tests.parallel.common import config

    with pytest.raises(ConfigError, match=message):
        config(overrides).layout(world)


def test_a_context_parallel_layout_counts_every_rank():
    from tests.parallel.common import config

    layout = config(["parallel.context=2", "parallel.tensor=2", "train.global_batch_size=4"]).layout(8)
    assert (layout.tensor, layout.pipeline, layout.context, layout.data, layout.replicas) == (2, 1, 2, 2, 4)
    assert layout.global_batch_size == 4  # sequences: the context ranks of a replica share them


def test_document_isolation_and_its_eos_id_are_part_of_what_the_weights_mean():
    """Changing `model.document_isolation` (or the EOS id it reads) on resume is refused, even with
    --allow-config-change; so is turning it on over a checkpoint written before the option existed
    (it had no isolation), while such a checkpoint resumes as before with the option off."""
    off = from_dict(HippoConfig, {"model": {"vocab_size": 300}})
    on = from_dict(HippoConfig, {"model": {"vocab_size": 300, "document_isolation": True, "eos_id": 256}})
    never, _ = resume_changes(to_dict(off), on)
    assert "model.document_isolation: False -> True" in never and "model.eos_id: None -> 256" in never
    other_eos = from_dict(HippoConfig, {"model": {"vocab_size": 300, "document_isolation": True, "eos_id": 0}})
    assert resume_changes(to_dict(on), other_eos)[0] == ["model.eos_id: 256 -> 0"]
    older = to_dict(off)
    del older["model"]["document_isolation"], older["model"]["eos_id"]
    assert resume_changes(older, off) == ([], [])
    never, _ = resume_changes(older, on)
    assert "model.document_isolation: False -> True" in never


def test_train_compile_resolves_by_device_and_may_change_on_resume():
    """`train.compile`: true, false, or auto (the default: on for CUDA, off on CPU, where compiling
    does not pay for itself within the quickstart's 300 steps); anything else names the option.
    It says how this invocation runs, not what is trained: a resume may switch it."""
    auto = load_config("tiny_hybrid")
    assert auto.train.compile == "auto"
    assert auto.train.compile_on("cuda") and not auto.train.compile_on("cpu")
    on, off = (load_config("tiny_hybrid", [f"train.compile={v}"]) for v in ("true", "false"))
    assert on.train.compile_on("cpu") and not off.train.compile_on("cuda")
    for bad in ("maybe", "1"):
        with pytest.raises(ConfigError, match=r"train\.compile"):
            load_config("tiny_hybrid", [f"train.compile={bad}"])
    assert resume_changes(to_dict(off), on) == ([], [])
