"""The pipeline's layer list is `HippoLM`'s own (`lm_layers`), under the parameter names checkpoints
hold: a checkpoint written by Hippo 0.1 (`tests/fixtures/checkpoint_v0_1`, before the list was
derived from `HippoLM`) names exactly these tensors, with these shapes and tensor-parallel split
patterns, and every name maps one-to-one onto `HippoLM`'s."""

from __future__ import annotations

import json
import re

import torch

from hippo.parallel.runtime import import_deepspeed

import_deepspeed()  # the CPU accelerator on a machine without a GPU

from hippo.parallel.pipeline import SequentialLM, canonical_names, layer_specs  # noqa: E402
from hippo.pretrain.models import SINGLE_PROCESS, HippoLM, ModelConfig  # noqa: E402
from hippo.pretrain.models.lm import lm_layers  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

CHECKPOINT = ROOT / "tests" / "fixtures" / "checkpoint_v0_1" / "run" / "checkpoints" / "global_step16"


def _saved() -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(**json.loads((CHECKPOINT / "hippo" / "state.json").read_text())["config"]["model"])
    return cfg, torch.load(CHECKPOINT / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def test_an_old_checkpoint_names_the_layer_lists_parameters():
    cfg, saved = _saved()
    shapes = {name: tuple(shape) for group in saved["param_shapes"] for name, shape in group.items()}
    with torch.device("meta"):
        whole = SequentialLM(cfg, SINGLE_PROCESS, None, seed=0)
    assert {name: tuple(p.shape) for name, p in whole.named_parameters()} == shapes
    # The universal converter's split patterns (written with Megatron's linears) name the same tensors.
    info = saved["universal_checkpoint_info"]
    patterns = info["tp_replicated_parameter_patterns"] + info["parameter_with_row_parallelism_patterns"]
    assert all(any(re.fullmatch(pattern, name) for name in shapes) for pattern in patterns)


def test_the_name_mapping_covers_hippolm_one_to_one():
    cfg, _ = _saved()
    with torch.device("meta"):
        names = canonical_names(SequentialLM(cfg, SINGLE_PROCESS, None, seed=0))
        lm = dict(HippoLM(cfg, init=False).named_parameters())
    assert sorted(names.values()) == sorted(lm)
    assert names["tied_modules.embedding.word.weight"] == "embedding.word.weight"
    assert names["1.norm1.weight"] == "layers.0.norm1.weight"
    assert names[f"{cfg.n_layer + 1}.weight"] == "norm_f.weight"


def test_the_layer_list_builds_hippolms_weights():
    """Each entry, built as a pipeline stage builds it, holds the single-process weights."""
    cfg, _ = _saved()
    lm = HippoLM(cfg, seed=7).state_dict()
    specs = layer_specs(cfg, SINGLE_PROCESS, seed=7)
    assert [repr(s) for s in specs] == [layer.name for layer in lm_layers(cfg)]
    for spec in specs:
        for name, p in spec.build().state_dict().items():
            assert torch.equal(p, lm[f"{spec.layer.name}.{name}"]), (spec.layer.name, name)
