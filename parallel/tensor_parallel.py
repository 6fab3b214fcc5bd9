"""Megatron-core tensor-parallel layers behind the models' `Linears` seam.

H3: Q, K, V column-parallel, each rank runs both SSMs on its d_model / TP channels, out-proj
row-parallel: no communication inside the SSM. Attention: Q, K, V split by heads, out-proj
row-parallel. MLP: fc1 column, fc2 row. Embedding split over the vocabulary, tied head giving
this rank's vocabulary slice of the logits, and a vocabulary-parallel cross entropy.

Megatron's layers return `(output, bias)`; the subclasses here return the output alone (the bias
added), so they stand in for `nn.Linear` without touching the model. Parameters are left for
`pretrain.models.init` (layout-independent), which reads the Megatron partition tags.

Sequence parallel (optional): between the tensor-parallel regions (norms, residual adds, dropout)
each rank holds L / TP positions of the hidden states. The embedding scatters them along the
sequence, column-parallel layers all-gather their input, row-parallel layers reduce-scatter their
output, and the head gathers the sequence again. Megatron's SP collectives work on the first dim
(sequence-first activations); the model is batch-first, so the layers here transpose around them.
Parameters applied to a sequence shard (norms, row-parallel biases) get `sequence_parallel` set:
`sequence_parallel_grad_hooks` sums their gradients over the TP group.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from hippo.parallel.megatron_compat import ModelParallelConfig, parallel_state, tensor_parallel
from hippo.parallel.runtime import import_deepspeed
from hippo.pretrain.models.linear import Linears, mark_tensor_parallel


def _initialized_elsewhere(weight: torch.Tensor) -> None:
    """Megatron asks for an init method; `pretrain.models.init` fills every parameter instead."""


def _sequence_first(f, x: torch.Tensor) -> torch.Tensor:
    """Apply `f` (a Megatron SP op on dim 0) to batch-first x: (B, L, ...) -> (B, L', ...)."""
    return f(x.transpose(0, 1).contiguous()).transpose(0, 1)


def _single_rank(config: ModelParallelConfig) -> bool:
    """Layers of a one-rank tensor-parallel group, where Megatron's linear is a plain matmul plus bias."""
    return config.tensor_model_parallel_size == 1 and not config.sequence_parallel


def _dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What Megatron's linear computes on one tensor-parallel rank (`matmul(x, w.t()) + b`), the same
    ops, under PyTorch's autograd instead of Megatron's autograd function: outputs and gradients are
    bitwise the same, without that function's copies of the inputs and gradients (`.contiguous()` for
    the weight gradient) and Python overhead: 5-15% of each linear's forward + backward on CPU
    (benchmarks/bench_train_overhead.py)."""
    y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


def _traced() -> bool:
    """Inside `torch.compile`: Megatron's linear autograd function overlaps its gradient all-reduce
    with async collectives and warns once through a function attribute, and dynamo breaks the
    graph on both (`async_op=True`, `setattr` on a function, `warnings.warn`: 36 breaks in a TP2
    hybrid). The compiled blocks take the same products through Megatron's region mappings, whose
    collectives are synchronous (dynamo traces them)."""
    return torch.compiler.is_compiling()


def _tp_group():
    """Passed explicitly: without it Megatron's mappings warn (a graph break of its own)."""
    return parallel_state.get_tensor_model_parallel_group()


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """in -> out / TP; the input gradient is all-reduced over the TP group (with SP: the input is
    all-gathered along the sequence, its gradient reduce-scattered)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, config: ModelParallelConfig):
        super().__init__(
            in_features, out_features, config=config, init_method=_initialized_elsewhere, bias=bias,
            gather_output=False, skip_bias_add=False,
        )
        mark_tensor_parallel(self.weight, 0)
        self.single_rank = _single_rank(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return _dense(x, self.weight, self.bias)
        if _traced():  # all-gather (reduce-scatter the gradient) along the sequence, or all-reduce the gradient
            if self.sequence_parallel:
                x = _sequence_first(lambda t: tensor_parallel.gather_from_sequence_parallel_region(t, group=_tp_group()), x)
            else:
                x = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=_tp_group())
            return _dense(x, self.weight, self.bias)
        if self.sequence_parallel:
            return _sequence_first(lambda t: super(ColumnLinear, self).forward(t)[0], x)
        return super().forward(x)[0]


class RowLinear(tensor_parallel.RowParallelLinear):
    """in / TP -> out, all-reduced over the TP group (with SP: reduce-scattered along the
    sequence); the bias is replicated."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, config: ModelParallelConfig):
        super().__init__(
            in_features, out_features, config=config, init_method=_initialized_elsewhere, bias=bias,
            input_is_parallel=True, skip_bias_add=False,
        )
        mark_tensor_parallel(self.weight, 1)
        self.single_rank = _single_rank(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single_rank:
            return _dense(x, self.weight, self.bias)
        if _traced():  # the partial products summed over the group (reduce-scattered under SP), then the bias
            y = _dense(x, self.weight, None)
            if self.sequence_parallel:
                y = _sequence_first(lambda t: tensor_parallel.reduce_scatter_to_sequence_parallel_region(t, group=_tp_group()), y)
            else:
                y = tensor_parallel.reduce_from_tensor_model_parallel_region(y, group=_tp_group())
            return y if self.bias is None else y + self.bias
        if self.sequence_parallel:
            return _sequence_first(lambda t: super(RowLinear, self).forward(t)[0], x)
        return super().forward(x)[0]


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """vocab / TP rows per rank; lookups outside this rank's rows are zero, then all-reduced
    (with SP: then split along the sequence)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, config: ModelParallelConfig):
        super().__init__(num_embeddings, embedding_dim, init_method=_initialized_elsewhere, config=config)
        mark_tensor_parallel(self.weight, 0)
        self.sequence_parallel = config.sequence_parallel

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = super().forward(input_ids)
        if self.sequence_parallel:
            h = _sequence_first(tensor_parallel.scatter_to_sequence_parallel_region, h)
        return h


def vocab_parallel_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Tied head: this rank's vocabulary slice; the gradient of h is summed over the TP group."""
    return F.linear(tensor_parallel.copy_to_tensor_model_parallel_region(h), weight)


def sequence_parallel_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Tied head under SP: gather the sequence (its backward reduce-scatters, summing the TP
    ranks' partial gradients), then this rank's vocabulary slice."""
    return F.linear(_sequence_first(tensor_parallel.gather_from_sequence_parallel_region, h), weight)


def mark_sequence_parallel_norms(module: torch.nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, torch.nn.LayerNorm):
            for p in sub.parameters(recurse=False):
                p.sequence_parallel = True


def sequence_parallel_grad_hooks(module: torch.nn.Module, tp_group) -> None:
    """Sum, over the TP group, the gradient of every parameter applied to a sequence shard.

    A tensor hook acts on each backward's fresh gradient before accumulation, so gradient
    accumulation over micro-batches stays a plain sum.
    """
    import torch.distributed as dist

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=tp_group)
        return grad

    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            p.register_hook(all_reduce)


def vocab_parallel_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy over the whole (split) vocabulary, in float32."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def tensor_parallel_rng():
    """The TP-rank dropout stream: DeepSpeed's tracker (seeded by `groups.seed_tensor_parallel_rng`),
    which works on CPU and GPU and which DeepSpeed's activation checkpointing replays."""
    return import_deepspeed().checkpointing.get_cuda_rng_tracker().fork()


def megatron_linears(tp_rank: int, tp_size: int, pp_size: int, *, sequence_parallel: bool = False) -> Linears:
    """`Linears` for a model built inside initialized Megatron process groups.

    Parameters are fp32 masters whatever the training precision: DeepSpeed casts for bf16.
    """
    config = ModelParallelConfig(
        sequence_parallel=sequence_parallel,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    return Linears(
        column=functools.partial(ColumnLinear, config=config),
        row=functools.partial(RowLinear, config=config),
        embedding=functools.partial(VocabEmbedding, config=config),
        lm_logits=sequence_parallel_logits if sequence_parallel else vocab_parallel_logits,
        cross_entropy=vocab_parallel_token_loss,
        tp_rng=tensor_parallel_rng,
        sequence_rng=tensor_parallel_rng if sequence_parallel else contextlib.nullcontext,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )
