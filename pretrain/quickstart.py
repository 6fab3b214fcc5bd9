"""The README's first command: a real, tiny pretraining job on CPU with nothing to download.

Writes the embedded default corpus (the Python standard library's sources), prepares it with the
byte tokenizer, trains `configs/tiny_hybrid.yaml` on it (tracked in the run folder's MLflow
store), evaluates the exported model on the held-out split and samples a few lines from it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from hippo.data_pipeline.default_corpus import write_default_corpus
from hippo.data_pipeline.prepare import prepare
from hippo.data_pipeline.tokenizer import Tokenizer
from hippo.pretrain.config import load_config
from hippo.pretrain.evaluation import evaluate_export
from hippo.pretrain.export import export_tokenizer, load_export
from hippo.pretrain.models.generation import SamplingConfig, generate
from hippo.pretrain.trainer import train

log = logging.getLogger(__name__)

PROMPTS = ["def ", "import ", "class "]


def quickstart(run_dir: Path, *, corpus_bytes: int = 3_000_000, overrides: list[str] | None = None) -> float:
    """Returns the validation loss of the trained model."""
    cfg = load_config("tiny_hybrid", overrides)
    data_dir = run_dir / "data"
    corpus = write_default_corpus(run_dir / "corpus" / "stdlib.jsonl", corpus_bytes)
    prepare([corpus], data_dir, tokenizer="byte", seq_len=cfg.train.seq_len, val_fraction=0.05, progress=True)
    cfg = load_config("tiny_hybrid", [f"data.paths=[{data_dir}]", *(overrides or [])])
    result = train(cfg, run_dir / "train")
    export = run_dir / "train" / "export"
    val_loss, tokens = evaluate_export(export, [str(data_dir)])
    model, meta = load_export(export)
    tok = export_tokenizer(export, meta)
    gen = torch.Generator().manual_seed(0)
    print(f"\ntrained {result.step} steps; validation ({tokens:,} held-out tokens): {_versus_uniform(val_loss, tok)}")
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        out = generate(model, ids, 120, SamplingConfig(temperature=0.7, top_p=0.95), vocab_size=model.cfg.vocab_size,
                       generator=gen, eos_id=tok.eos_id)
        print(f"--- sample from {prompt!r}\n{prompt}{tok.decode(out[0, ids.shape[1]:].tolist())}")
    print(f"\nrun folder: {run_dir}  (MLflow store: {run_dir / 'train' / 'mlflow.db'}; "
          f"`mlflow ui --backend-store-uri sqlite:///{run_dir / 'train' / 'mlflow.db'}`)")
    return val_loss


def _versus_uniform(loss: float, tok: Tokenizer) -> str:
    """Loss and perplexity, each beside what a uniform guess over the vocabulary scores."""
    unit = "bytes" if tok.name == "byte" else "tokens"
    return (f"loss {loss:.3f} (a uniform guess over {tok.vocab_size} {unit}: {math.log(tok.vocab_size):.3f}), "
            f"perplexity {math.exp(loss):.2f} (uniform: {tok.vocab_size})")
