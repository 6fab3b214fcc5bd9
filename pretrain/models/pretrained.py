"""A model folder: `config.json` (the model config under "model", plus what the caller adds) and its
weights as safetensors, one file or shards with an index (the Hugging Face layout), so a folder
moves, and loads, as a unit. `hippo_files.json`, written last, records each file's size and SHA-256;
loading checks them first, so a damaged or truncated file is refused by name, never used."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.file_record import file_entry, listing_problem
from hippo.pretrain.models.hf_config import from_hf_config, is_hf_config

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
RECORD = "hippo_files.json"
MAX_SHARD_BYTES = 4 * 2**30
_unrecorded_warned: set[Path] = set()


class ModelFolderError(RuntimeError):
    """A model folder's file is missing, truncated or damaged against its record; names the file."""

    same_on_every_rank = True
    """Every rank of a job reads the same folder: the CLI reports it once (rank 0)."""


def model_files(folder: Path) -> list[str]:
    """The files a model folder is made of: config, weights (one file, or the index and its shards), tokenizer."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        weights = [INDEX, *sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))]
    else:
        weights = [WEIGHTS]
    return [CONFIG, *weights, *([TOKENIZER_FILE] if (folder / TOKENIZER_FILE).exists() else [])]


def write_record(folder: Path) -> None:
    """`hippo_files.json`: size and SHA-256 of each of the folder's files, written once they all are."""
    folder = Path(folder)
    _write_json(folder / RECORD, {"files": {name: file_entry(folder / name) for name in model_files(folder)}})


def check_files(folder: Path) -> None:
    """Refuse a folder whose files differ from its record; a folder written before records existed
    loads with one warning (per process)."""
    folder = Path(folder)
    if not (folder / RECORD).exists():
        if _is_hf_folder(folder):  # transformers' format: its own tools rewrite config.json, no record to keep
            return
        if folder.resolve() not in _unrecorded_warned:
            _unrecorded_warned.add(folder.resolve())
            log.warning("%s has no %s (written before exports were checksummed): its files are not verified; "
                        "export it again to add the record", folder, RECORD)
        return
    try:
        listing = json.loads((folder / RECORD).read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"{folder / RECORD} is damaged ({e}): write the export again") from None
    if problem := listing_problem(folder, listing):
        raise ModelFolderError(f"{folder}: {problem}; the model folder is damaged: write the export again "
                               "(`hippo export RUN_DIR -o DIR`) or copy it again")


def _is_hf_folder(folder: Path) -> bool:
    try:
        return is_hf_config(json.loads((folder / CONFIG).read_text()))
    except (OSError, ValueError):
        return False


def save_weights(folder: Path, tensors: dict[str, torch.Tensor], *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """One file up to `max_shard_bytes`, else shards of at most that size and an index. Each file
    is written under a temporary name and renamed, so a folder never holds half a file."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        _save_atomic(shards[0], folder / WEIGHTS)
        (folder / INDEX).unlink(missing_ok=True)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        save_shard(folder, shard, i, len(shards))
        weight_map.update(dict.fromkeys(shard, shard_name(i, len(shards))))
    write_index(folder, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def save_shard(folder: Path, tensors: dict[str, torch.Tensor], index: int, count: int) -> None:
    """Shard `index` of `count` (written by whichever process holds those tensors)."""
    _save_atomic({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, Path(folder) / shard_name(index, count))


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index over shards; a single-file model of an earlier save is removed, so only one is read."""
    _write_json(Path(folder) / INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    (Path(folder) / WEIGHTS).unlink(missing_ok=True)


def load_weights(folder: Path, device: str | torch.device = "cpu", *, checked: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, after `check_files` (unless the caller has just `checked`)."""
    folder = Path(folder)
    if not checked:
        check_files(folder)
    if (folder / INDEX).exists():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        out: dict[str, torch.Tensor] = {}
        for file in sorted(set(weight_map.values())):
            out.update(load_file(str(folder / file), device=str(device)))
        return out
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS} nor {INDEX}: not a Hippo model folder")
    return load_file(str(folder / WEIGHTS), device=str(device))


def weight_reader(folder: Path) -> Callable[[str], torch.Tensor]:
    """`read(name)` -> that one tensor, read from its file on demand (safetensors maps the file):
    a rank of a large job takes only the tensors of its own stage."""
    folder = Path(folder)
    check_files(folder)
    if (folder / INDEX).exists():
        files = {name: folder / file for name, file in json.loads((folder / INDEX).read_text())["weight_map"].items()}
    elif (folder / WEIGHTS).exists():
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            files = dict.fromkeys(f.keys(), folder / WEIGHTS)
    else:
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS} nor {INDEX}: not a Hippo model folder")

    def read(name: str) -> torch.Tensor:
        if name not in files:
            raise KeyError(f"{folder} holds no tensor {name!r}: it is not a model of this architecture")
        with safe_open(str(files[name]), framework="pt") as f:
            return f.get_tensor(name)

    return read


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a Hippo model folder") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if isinstance(meta, dict) and is_hf_config(meta):  # `hippo export --format hf`: Hippo's names, HF's config
        return from_hf_config(meta, str(path))
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{path} has no \"model\" section: not a Hippo model folder")
    return meta


def write_config(folder: Path, cfg: ModelConfig, **meta: Any) -> None:
    """config.json: the model config under "model", and what the caller adds (tokenizer, step)."""
    _write_json(Path(folder) / CONFIG, {"model": dataclasses.asdict(cfg), **meta})


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
