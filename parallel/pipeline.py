"""The language model as a list of layers, for DeepSpeed's pipeline (and, unsplit, for ZeRO-2).

The list is `HippoLM`'s own (`pretrain.models.lm.lm_layers`): [embedding (tied), block 0 ..
block n-1, final norm, head (tied to the embedding)]; each stage builds only its entries. The one
mapping between DeepSpeed's parameter names (`tied_modules.embedding.*`, `1.*`, ...: a tied entry
under its `HippoLM` name, any other under its index in the list) and `HippoLM`'s is the
`canonical_prefix` each built layer carries (`build_layer`): the layer is initialized with exactly
the single-process weights under it, and `canonical_named_parameters` gathers them back.
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
from hippo.pretrain.models.init import init_parameters
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears
from hippo.pretrain.models.lm import LMLayer, lm_layers


def build_layer(layer: LMLayer, cfg: ModelConfig, linears: Linears, seed: int) -> nn.Module:
    """One entry's module, with the weights it has in the single-process `HippoLM` of `seed`."""
    module = layer.build()
    module.canonical_prefix = layer.name + "."
    init_parameters(module, cfg, seed=seed, prefix=module.canonical_prefix, tp_rank=linears.tp_rank,
                    tp_size=linears.tp_size)
    return module


def layer_specs(cfg: ModelConfig, linears: Linears, seed: int) -> list:
    """`lm_layers` as DeepSpeed `LayerSpec`s: a stage builds (`build_layer`) only its own entries."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    class Entry:
        layer: LMLayer

        def build(self, log: bool = False) -> nn.Module:
            return build_layer(self.layer, cfg, linears, seed)

        def __repr__(self) -> str:  # DeepSpeed lists each stage's layers (at DEBUG: `quiet`)
            return self.layer.name

    class Spec(Entry, LayerSpec):
        pass

    class TiedSpec(Entry, TiedLayerSpec):
        pass

    specs = []
    for layer in lm_layers(cfg, linears):
        spec = (TiedSpec(layer.name, nn.Module, forward_fn=layer.forward, tied_weight_attr=list(layer.tied_weights))
                if layer.tied_weights else Spec(nn.Module))
        spec.layer = layer
        specs.append(spec)
    return specs


def stage_bounds(cfg: ModelConfig, layout: ParallelLayout) -> list[int]:
    """Layer-list boundaries of the pipeline stages: stage s runs layers [b[s], b[s+1]).

    `layout.stage_layers` gives blocks per stage (the embedding goes first, norm and head
    last). Otherwise this is what DeepSpeed's `partition_method` computes, from the same
    per-layer counts (one TP rank's trainable parameters, tied layers counted at both ends)
    counted on the meta device, so memory estimates and the running pipeline agree.
    """
    n_layers = len(lm_layers(cfg))
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
        return [sum(x.numel() for x in layer.build().parameters()) for layer in lm_layers(cfg, linears)]


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
        checkpointable_layers=[Block.__name__],
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
        self.loss_fn = loss_fn
        self.checkpoint_blocks = activation_checkpointing
        self.tied_modules = nn.ModuleDict()
        self._funcs: list[Callable] = []
        for idx, layer in enumerate(lm_layers(cfg, linears)):
            if layer.tied_weights:
                if layer.name not in self.tied_modules:
                    self.tied_modules[layer.name] = build_layer(layer, cfg, linears, seed)
                module = self.tied_modules[layer.name]
            else:
                module = build_layer(layer, cfg, linears, seed)
                self.add_module(str(idx), module)
            self._funcs.append(partial(layer.forward, module) if layer.forward else module)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from hippo.parallel.runtime import import_deepspeed

        x = input_ids
        for f in self._funcs:
            if self.checkpoint_blocks and self.training and isinstance(f, Block):
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
