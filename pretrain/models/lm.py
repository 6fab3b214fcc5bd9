"""HippoLM: token embedding, a stack of pre-norm blocks (H3, S4D or attention mixers), final
LayerNorm, and an LM head tied to the embedding. No position embeddings unless configured
(H3 layers give attention layers their sense of order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.block import Block
from hippo.pretrain.models.embedding import TokenEmbedding
from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.init import init_parameters
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears
from hippo.pretrain.models.loss import mean_kept_loss
from hippo.pretrain.models.pretrained import check_files, load_weights, read_config, save_weights, write_config, write_record


@dataclass(frozen=True)
class LMLayer:
    """One entry of the LM's layer list: a submodule of `HippoLM` and how to build it."""

    name: str
    """Its name in `HippoLM` ("embedding", "layers.3", "norm_f"); an entry that repeats an earlier
    name reuses that module (the tied LM head)."""
    build: Callable[[], nn.Module]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    """How the layer list calls the module, where not its own `forward` (the head: `TokenEmbedding.logits`).
    What one entry returns the next one takes, across pipeline stages too: one hidden-state tensor
    today; a tuple (hidden, side tensors) would pass the same way."""
    tied_weights: tuple[str, ...] = field(default=())
    """Parameters shared between the entries of this name (summed over pipeline stages)."""


def lm_layers(cfg: ModelConfig, linears: Linears = SINGLE_PROCESS) -> list[LMLayer]:
    """The LM in forward order: embedding, blocks, final norm, head tied to the embedding.

    The one place the LM is composed: `HippoLM` builds its submodules from it, and the pipeline
    (`hippo.parallel.pipeline`) its layer list, each stage only its own entries. A new mixer or a
    block change lives in `Block`; a new top-level layer is one entry here (and `HippoLM.forward`).
    """
    tied = ("word.weight",)
    embedding = partial(TokenEmbedding, cfg, linears)
    return [
        LMLayer("embedding", embedding, tied_weights=tied),
        *(LMLayer(f"layers.{i}", partial(Block, cfg, i, linears)) for i in range(cfg.n_layer)),
        LMLayer("norm_f", partial(nn.LayerNorm, cfg.d_model, eps=cfg.layer_norm_eps)),
        LMLayer("embedding", embedding, forward=TokenEmbedding.logits, tied_weights=tied),
    ]


class HippoLM(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: Linears = SINGLE_PROCESS, *, seed: int = 0, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.linears = linears
        for layer in lm_layers(cfg, linears):
            parent, _, child = layer.name.rpartition(".")
            if parent and parent not in dict(self.named_children()):
                # `layers`: a ModuleDict keyed by layer index, so names survive pipeline splits and checkpoints.
                self.add_module(parent, nn.ModuleDict())
            owner = self.get_submodule(parent) if parent else self
            if child not in dict(owner.named_children()):  # else the tied head: the embedding, built
                owner.add_module(child, layer.build())
        if init:
            init_parameters(self, cfg, seed=seed, tp_rank=linears.tp_rank, tp_size=linears.tp_size)

    def forward(
        self, input_ids: torch.Tensor, inference_params: InferenceParams | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, padded_vocab / TP), or (B, 1, ...) with `last_only`
        (a generation prefill needs only the last position: the LM head is a large share of it)."""
        h = self.hidden_states(input_ids, inference_params)
        return self.embedding.logits(h[:, -1:] if last_only else h)

    def hidden_states(self, input_ids: torch.Tensor, inference_params: InferenceParams | None = None) -> torch.Tensor:
        """input_ids (B, L) -> the final norm's output (B, L, D): everything but the LM head."""
        offset = inference_params.seqlen_offset if inference_params is not None else 0
        if offset > 0 and input_ids.shape[1] != 1:
            raise ValueError("after the prefill, recurrent mode takes one token per call")
        h = self.embedding.embed(input_ids, offset)
        doc_start = self._documents(input_ids, inference_params) if self.cfg.document_isolation else None
        return self.trunk(h, inference_params, doc_start=doc_start)

    def _documents(self, input_ids: torch.Tensor, params: InferenceParams | None) -> torch.Tensor | None:
        """The boundary map of a training forward or a prefill; on a decode step None, and the
        rows whose previous token was EOS marked in `params.doc_reset` instead."""
        if params is None:
            return self.embedding.doc_start(input_ids)
        decode = params.seqlen_offset > 0
        params.doc_reset = params.previous_eos if decode else None
        params.previous_eos = input_ids[:, -1] == self.cfg.eos_id
        return None if decode else self.embedding.doc_start(input_ids)

    def trunk(self, h: torch.Tensor, inference_params: InferenceParams | None = None, *,
              doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks and final norm on hidden states (B, L, D); `doc_start` (B, L) bool: where packed
        documents begin (`model.document_isolation`), None for none."""
        for block in self.layers.values():
            h = block(h, inference_params, doc_start=doc_start)
        return self.norm_f(h)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy (whole vocabulary, also under TP) over the positions whose
        label is not `loss.IGNORE_INDEX` (all of them unless labels were masked, as
        `loss.eod_masked_labels` does for `train.eod_mask_loss`)."""
        return mean_kept_loss(self.linears.cross_entropy, self(input_ids), labels)

    def save_pretrained(self, folder: str | Path, **meta: Any) -> Path:
        """Config (plus `meta`: tokenizer, step, ...) and weights (the tied head stored once)."""
        return save_pretrained(folder, dict(self.named_parameters()), self.cfg, **meta)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> HippoLM:
        """The model of a folder written by `save_pretrained` (or `hippo export`), in eval mode."""
        check_files(folder)
        meta = read_config(folder)
        model = cls(ModelConfig(**meta["model"]), init=False)
        weights = load_weights(folder, checked=True)
        expected = dict(model.named_parameters())
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        wrong = [k for k in expected.keys() & weights.keys() if weights[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{folder}: the weights do not fit its config.json: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
        model.load_state_dict(weights, strict=False)
        return model.to(device).eval()


def save_pretrained(folder: str | Path, params: dict[str, torch.Tensor], cfg: ModelConfig, **meta: Any) -> Path:
    """What `HippoLM.save_pretrained` writes, from full tensors under `HippoLM` names (as the
    trainer gathers them from any layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder, params)
    write_config(folder, cfg, **meta)
    write_record(folder)
    return folder


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the single-process model (tied head counted once), without allocating."""
    with torch.device("meta"):
        model = HippoLM(cfg, init=False)
    return sum(p.numel() for p in model.parameters())
