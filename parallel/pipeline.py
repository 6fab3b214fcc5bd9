"""The language model as a list of layers, for DeepSpeed's pipeline (and, unsplit, for ZeRO-2).

Layer list: [embedding (tied), block 0 .. block n-1, final norm, head (tied to the embedding)].
Each layer module knows its prefix in the single-process `HippoLM` (`canonical_prefix`), so it is
initialized with exactly the single-process weights and its parameters can be gathered back
under `HippoLM`'s names (`canonical_named_parameters`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn as nn

from hippo.parallel.deepspeed_compat import deepspeed_partition, explicit_stages_pipeline
from hippo.parallel.layout import ParallelLayout
from hippo.pretrain.models.block import Block
from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.embedding import TokenEmbedding
from hippo.pretrain.models.init import init_parameters
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears

TIED_KEY = "embedding"


class EmbeddingLayer(TokenEmbedding):
    canonical_prefix = "embedding."

    def __init__(self, cfg: ModelConfig, linears: Linears, seed: int):
        super().__init__(cfg, linears)
        init_parameters(self, cfg, seed=seed, prefix=self.canonical_prefix, tp_rank=linears.tp_rank, tp_size=linears.tp_size)


def lm_head(embedding: EmbeddingLayer, h: torch.Tensor) -> torch.Tensor:
    return embedding.logits(h)


class BlockLayer(Block):
    def __init__(self, cfg: ModelConfig, layer_idx: int, linears: Linears, seed: int):
        super().__init__(cfg, layer_idx, linears)
        self.canonical_prefix = f"layers.{layer_idx}."
        init_parameters(self, cfg, seed=seed, prefix=self.canonical_prefix, tp_rank=linears.tp_rank, tp_size=linears.tp_size)


class FinalNormLayer(nn.LayerNorm):
    canonical_prefix = "norm_f."

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, eps=cfg.layer_norm_eps)


def layer_specs(cfg: ModelConfig, linears: Linears, seed: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec(TIED_KEY, EmbeddingLayer, cfg, linears, seed, tied_weight_attr=["word.weight"]),
        *(LayerSpec(BlockLayer, cfg, i, linears, seed) for i in range(cfg.n_layer)),
        LayerSpec(FinalNormLayer, cfg),
        TiedLayerSpec(TIED_KEY, EmbeddingLayer, cfg, linears, seed, forward_fn=lm_head, tied_weight_attr=["word.weight"]),
    ]


def stage_bounds(cfg: ModelConfig, layout: ParallelLayout) -> list[int]:
    """Layer-list boundaries of the pipeline stages: stage s runs layers [b[s], b[s+1]).

    `layout.stage_layers` gives blocks per stage (the embedding goes first, norm and head
    last). Otherwise this is what DeepSpeed's `partition_method` computes, from the same
    per-layer counts (one TP rank's trainable parameters, tied layers counted at both ends)
    counted on the meta device, so memory estimates and the running pipeline agree.
    """
    n_layers = cfg.n_layer + 3
    if layout.stage_layers:
        bounds = [0]
        for s, blocks in enumerate(layout.stage_layers):
            bounds.append(bounds[-1] + blocks + (1 if s == 0 else 0))
        bounds[-1] = n_layers
        return bounds
    if layout.pipeline_partition == "uniform":
        return deepspeed_partition(layout.pipeline, items=n_layers)
    return deepspeed_partition(layout.pipeline, weights=layer_parameter_counts(cfg, shard_shaped_linears(layout.tensor)))


def shard_shaped_linears(tp: int) -> Linears:
    """Plain layers with one tensor-parallel rank's shapes (for counting only)."""
    return Linears(
        column=lambda i, o, *, bias=True: nn.Linear(i, o // tp, bias=bias),
        row=lambda i, o, *, bias=True: nn.Linear(i // tp, o, bias=bias),
        embedding=lambda v, d: nn.Embedding(v // tp, d),
        tp_size=tp,
    )


def layer_parameter_counts(cfg: ModelConfig, linears: Linears = SINGLE_PROCESS) -> list[int]:
    """Parameters of each entry of the layer list (the tied head counted like the embedding),
    with `linears`' shard shapes; built on the meta device, nothing allocated."""
    with torch.device("meta"):
        embedding = sum(x.numel() for x in TokenEmbedding(cfg, linears).parameters())
        blocks = [sum(x.numel() for x in Block(cfg, i, linears).parameters()) for i in range(cfg.n_layer)]
        norm = sum(x.numel() for x in FinalNormLayer(cfg).parameters())
    return [embedding, *blocks, norm, embedding]


def build_pipeline(cfg: ModelConfig, layout: ParallelLayout, linears: Linears, topology, loss_fn: Callable, *,
                   seed: int) -> nn.Module:
    """A DeepSpeed `PipelineModule` holding this stage's layers."""
    from deepspeed.pipe import PipelineModule

    common = dict(
        layers=layer_specs(cfg, linears, seed),
        topology=topology,
        loss_fn=loss_fn,
        activation_checkpoint_interval=1 if layout.activation_checkpointing else 0,
        # Only blocks: the embedding's input is token ids, and a reentrant checkpoint of a
        # layer whose inputs need no gradient returns an output that has none.
        checkpointable_layers=[BlockLayer.__name__],
    )
    if not layout.stage_layers:
        return PipelineModule(partition_method=layout.pipeline_partition, **common)
    return explicit_stages_pipeline(lambda: stage_bounds(cfg, layout), **common)


class SequentialLM(nn.Module):
    """The whole layer list on one stage, for DeepSpeed's plain engine (ZeRO-2 needs it).

    Parameter names match `PipelineModule`'s (`tied_modules.embedding.*`, `1.*`, ...), so both
    engines' checkpoints describe the same tensors.
    """

    def __init__(self, cfg: ModelConfig, linears: Linears, loss_fn: Callable | None, *, seed: int,
                 activation_checkpointing: bool = False):
        super().__init__()
        from deepspeed.pipe import TiedLayerSpec

        self.loss_fn = loss_fn
        self.checkpoint_blocks = activation_checkpointing
        self.tied_modules = nn.ModuleDict()
        self._funcs: list[Callable] = []
        for idx, spec in enumerate(layer_specs(cfg, linears, seed)):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                module = self.tied_modules[spec.key]
                self._funcs.append(partial(spec.forward_fn, module) if spec.forward_fn else module)
            else:
                module = spec.build()
                self.add_module(str(idx), module)
                self._funcs.append(module)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from hippo.parallel.runtime import import_deepspeed

        x = input_ids
        for f in self._funcs:
            if self.checkpoint_blocks and self.training and isinstance(f, BlockLayer):
                x = import_deepspeed().checkpointing.checkpoint(f, x)
            else:
                x = f(x)
        return self.loss_fn(x, labels)


def canonical_named_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """This process's parameters under their single-process `HippoLM` names (each once)."""
    seen: set[int] = set()
    for sub in module.modules():
        prefix = getattr(sub, "canonical_prefix", None)
        if prefix is None:
            continue
        for name, p in sub.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, p


def canonical_names(module: nn.Module) -> dict[str, str]:
    """{name in `module` (pipeline / DeepSpeed naming): name in the single-process `HippoLM`}."""
    by_id = {id(p): name for name, p in canonical_named_parameters(module)}
    return {name: by_id[id(p)] for name, p in module.named_parameters()}
