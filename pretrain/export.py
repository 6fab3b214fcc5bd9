"""A consolidated single-file model: safetensors weights under `HippoLM` names plus the config
and tokenizer needed to use it on one process (`hippo generate`, `hippo eval`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hippo.pretrain.checkpoint import Checkpoint, CheckpointManager
from hippo.pretrain.config import HippoConfig, ModelConfig, from_dict, to_dict
from hippo.pretrain.models import SINGLE_PROCESS, HippoLM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_export(folder: Path, params: dict[str, torch.Tensor], model_cfg: ModelConfig, *, tokenizer: str, step: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp))
    tmp.replace(folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps({"model": to_dict(model_cfg), "tokenizer": tokenizer, "step": step}, indent=1))
    return folder


def export_checkpoint(ckpt: Checkpoint, out: Path) -> Path:
    """Consolidate a training checkpoint of any layout: DeepSpeed's universal conversion gives
    full fp32 tensors under pipeline names, which are mapped to `HippoLM`'s."""
    from hippo.parallel.pipeline import SequentialLM, canonical_names

    cfg = from_dict(HippoConfig, ckpt.state.config)
    with torch.device("meta"):
        names = canonical_names(SequentialLM(cfg.model, SINGLE_PROCESS, None, seed=cfg.train.seed))
    universal = CheckpointManager.universal_parameters(ckpt, list(names))
    params = {names[pipe_name]: tensor for pipe_name, tensor in universal.items()}
    # `load_tokenizer` takes a prepared folder and finds the tokenizer it was made with.
    return save_export(out, params, cfg.model, tokenizer=cfg.data.paths[0], step=ckpt.step)


def load_export(folder: Path) -> tuple[HippoLM, dict]:
    """The model (eval mode, CPU) and the export's metadata (tokenizer spec, step)."""
    folder = Path(folder)
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}: not a `hippo export` folder")
    meta = json.loads((folder / CONFIG).read_text())
    model = HippoLM(from_dict(ModelConfig, meta["model"], "model"), init=False)
    missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS} does not fit its config: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta
