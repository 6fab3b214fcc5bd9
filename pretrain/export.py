"""A self-contained model folder (`hippo export`, and the end of `hippo train`): config, safetensors
weights under `HippoLM` names, and a copy of the tokenizer, so the folder alone serves `hippo eval`,
`hippo generate`, `hippo train --init-from` and `HippoLM.from_pretrained`, wherever it is moved."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from hippo.data_pipeline.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from hippo.pretrain.checkpoint import Checkpoint, CheckpointManager
from hippo.pretrain.config import ConfigError, HippoConfig, ModelConfig, from_dict
from hippo.pretrain.models import SINGLE_PROCESS, HippoLM
from hippo.pretrain.models.lm import save_pretrained
from hippo.pretrain.models.pretrained import (CONFIG, TOKENIZER_FILE, WEIGHTS, read_config, save_shard, shard_name,
                                              write_config, write_index, write_record)

UNIVERSAL_SCRATCH = ".universal"
"""Inside the folder being written: where a checkpoint's universal form is made, then deleted."""

__all__ = ["CONFIG", "WEIGHTS", "TOKENIZER_FILE", "save_export", "checkpoint_parameters", "export_checkpoint",
           "load_export", "export_tokenizer"]


def save_export(folder: Path, params: dict[str, torch.Tensor], model_cfg: ModelConfig, *,
                tokenizer: Tokenizer | str, step: int) -> Path:
    """`tokenizer`: the tokenizer itself or what `load_tokenizer` takes (a prepared folder, a
    tokenizer.json, "byte"); its vocabulary is copied into the folder, not referenced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return save_pretrained(folder, params, model_cfg, step=step, **_copy_tokenizer(folder, tokenizer))


def save_export_by_stage(folder: Path, stage_params: dict[str, torch.Tensor] | None, *, stage: int, stages: int,
                         model_cfg: ModelConfig, tokenizer: Tokenizer | str, step: int) -> Path:
    """The export of a pipeline-parallel run without gathering the model anywhere: the one rank of
    each stage that holds its full tensors (`stage_params`; None on the others) writes them as that
    stage's shard, and rank 0 the index, config and tokenizer. Collective: every rank calls it."""
    import torch.distributed as dist

    folder = Path(folder)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    held: list = [None] * dist.get_world_size()
    sizes = None if stage_params is None else {k: t.numel() * t.element_size() for k, t in stage_params.items()}
    dist.all_gather_object(held, None if sizes is None else (stage, sizes))
    writers = sorted((h for h in held if h is not None), key=lambda h: h[0])
    owner: dict[str, int] = {}
    for s, names in writers:
        for name in names:
            owner.setdefault(name, s)  # the tied embedding: written once, by the first stage
    if stage_params is not None:
        save_shard(folder, {k: t for k, t in stage_params.items() if owner[k] == stage}, stage, stages)
    dist.barrier()
    if dist.get_rank() == 0:
        total = sum(dict(writers)[s][k] for k, s in owner.items())
        write_index(folder, {k: shard_name(s, stages) for k, s in owner.items()}, total)
        write_config(folder, model_cfg, step=step, **_copy_tokenizer(folder, tokenizer))
        write_record(folder)
    dist.barrier()
    return folder


def _copy_tokenizer(folder: Path, tokenizer: Tokenizer | str) -> dict:
    """Write the tokenizer into the folder; the config.json entries that name it."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    identity = tok.identity()
    if isinstance(tok, ByteTokenizer):
        spec = "byte"
    else:
        (folder / TOKENIZER_FILE).write_text(tok.to_json(), encoding="utf-8")
        spec = TOKENIZER_FILE
    identity.update(spec=spec, eos_token=tok.eos_token if isinstance(tok, HFTokenizer) else None)
    return {"tokenizer": spec, "tokenizer_info": identity}


def checkpoint_parameters(ckpt: Checkpoint, out: Path) -> tuple[dict[str, torch.Tensor], HippoConfig]:
    """Full tensors of a training checkpoint of any layout under `HippoLM` names, and its config:
    DeepSpeed's universal conversion gives full fp32 tensors under pipeline names, mapped here. The
    conversion is made in a scratch folder inside `out` (the folder being written) and deleted:
    the source run is only read."""
    from hippo.parallel.pipeline import SequentialLM, canonical_names

    cfg = from_dict(HippoConfig, ckpt.state.config)
    with torch.device("meta"):
        names = canonical_names(SequentialLM(cfg.model, SINGLE_PROCESS, None, seed=cfg.train.seed))
    scratch = Path(out) / UNIVERSAL_SCRATCH
    try:
        universal = CheckpointManager.universal_parameters(ckpt, list(names), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {names[pipe_name]: tensor for pipe_name, tensor in universal.items()}, cfg


def export_checkpoint(ckpt: Checkpoint, out: Path) -> Path:
    """Consolidate a training checkpoint of any layout into an export folder."""
    params, cfg = checkpoint_parameters(ckpt, out)
    return save_export(out, params, cfg.model, tokenizer=cfg.data.paths[0], step=ckpt.step)


def load_export(folder: Path, *, device: str | torch.device = "cpu") -> tuple[HippoLM, dict]:
    """The model (eval mode) and the export's metadata (tokenizer, step)."""
    folder = Path(folder)
    try:
        meta = read_config(folder)
        return HippoLM.from_pretrained(folder, device=device), meta
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{folder}: not a usable Hippo export ({e}); write it again with `hippo export`") from None


def export_tokenizer(folder: Path, meta: dict) -> Tokenizer:
    """The export's own copy of its tokenizer (exports written before the copy existed name a
    prepared folder or tokenizer.json elsewhere: that is loaded instead)."""
    spec = meta["tokenizer"]
    if spec == "byte":
        return ByteTokenizer()
    info = meta.get("tokenizer_info") or {}
    local = Path(folder) / spec
    tok = load_tokenizer(str(local) if local.is_file() else spec, eos_token=info.get("eos_token"))
    if info.get("hash") and tok.identity_hash != info["hash"]:
        raise ConfigError(f"{local}: tokenizer hash {tok.identity_hash} differs from config.json's {info['hash']}")
    return tok
