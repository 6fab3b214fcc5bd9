"""Loss and perplexity of an exported model on a prepared split, on one process."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hippo.data_pipeline.config import DataConfig
from hippo.data_pipeline.errors import ManifestError
from hippo.data_pipeline.manifest import load_manifest
from hippo.data_pipeline.stream import build_stream
from hippo.data_pipeline.tokenizer import Tokenizer
from hippo.pretrain.export import CONFIG, export_tokenizer, load_export

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_export(folder: Path, data_paths: list[str], *, split: str = "validation", batch_size: int = 8,
                    max_batches: int | None = None, device: torch.device | str = "cpu") -> tuple[float, int]:
    """Mean next-token loss over the split (one pass, manifest order) and the tokens it covered."""
    model, meta = load_export(folder, device=torch.device(device))
    check_data_fits(Path(folder), meta, model.cfg.vocab_size, data_paths)
    stream = build_stream(DataConfig(paths=list(data_paths), split=split), dp_rank=0, dp_size=1,
                          micro_batch_size=batch_size, global_batch_size=batch_size, one_pass=True,
                          max_batches=max_batches)
    total, tokens = 0.0, 0
    for batch in stream:
        batch = batch.to(device)
        n = batch[:, 1:].numel()
        total += model.loss(batch[:, :-1], batch[:, 1:]).item() * n
        tokens += n
    return total / tokens, tokens


def check_data_fits(folder: Path, meta: dict, vocab_size: int, data_paths: list[str]) -> None:
    """Refuses data prepared with another tokenizer than the model's: its loss would be a number
    without meaning (or an index error deep in the embedding). Raises ManifestError."""
    model_tok = _export_tokenizer(folder, meta)
    for path in data_paths:
        info = load_manifest(path).tokenizer
        if model_tok is not None and info["hash"] != model_tok.identity_hash:
            raise ManifestError(
                f"{path} was prepared with tokenizer {info['name']} (hash {info['hash']}), but the model {folder} "
                f"uses {model_tok.name} (hash {model_tok.identity_hash}): prepare the data with the model's "
                f"tokenizer, `hippo data prepare INPUT... -o DIR --tokenizer {model_tok.spec}`")
        if info["vocab_size"] > vocab_size:
            raise ManifestError(
                f"{path} holds token ids up to {info['vocab_size'] - 1} (tokenizer {info['name']}), beyond the "
                f"vocabulary of {vocab_size} of the model {folder}: the data was made with another tokenizer; "
                "prepare it with the one the model was trained with")


def _export_tokenizer(folder: Path, meta: dict) -> Tokenizer | None:
    """The tokenizer the export's config.json names (a prepared folder or a spec), if it still loads."""
    try:
        return export_tokenizer(folder, meta)
    except (ValueError, OSError, KeyError) as e:
        log.warning("cannot load the tokenizer %r named in %s (%s): only the vocabulary size of the data "
                    "is checked", meta.get("tokenizer"), folder / CONFIG, e)
        return None
