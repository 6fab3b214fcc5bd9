"""Megatron-core tensor-parallel layers behind the models' `Linears` seam.

H3: Q, K, V column-parallel, each rank runs both SSMs on its d_model / TP channels, out-proj
row-parallel: no communication inside the SSM. Attention: Q, K, V split by heads, out-proj
row-parallel. MLP: fc1 column, fc2 row. Embedding split over the vocabulary, tied head giving
this rank's vocabulary slice of the logits, and a vocabulary-parallel cross entropy.

Megatron's layers return `(output, bias)`; the subclasses here return the output alone (the bias
added), so they stand in for `nn.Linear` without touching the model. Parameters are left for
`pretrain.models.init` (layout-independent), which reads the Megatron partition tags.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel

from pretrain.models.linear import Linears, mark_tensor_parallel


def _initialized_elsewhere(weight: torch.Tensor) -> None:
    """Megatron asks for an init method; `pretrain.models.init` fills every parameter instead."""


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """in -> out / TP; the input gradient is all-reduced over the TP group."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, config: ModelParallelConfig):
        super().__init__(
            in_features, out_features, config=config, init_method=_initialized_elsewhere, bias=bias,
            gather_output=False, skip_bias_add=False,
        )
        mark_tensor_parallel(self.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowLinear(tensor_parallel.RowParallelLinear):
    """in / TP -> out, all-reduced over the TP group; the bias is replicated."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, config: ModelParallelConfig):
        super().__init__(
            in_features, out_features, config=config, init_method=_initialized_elsewhere, bias=bias,
            input_is_parallel=True, skip_bias_add=False,
        )
        mark_tensor_parallel(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """vocab / TP rows per rank; lookups outside this rank's rows are zero, then all-reduced."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, config: ModelParallelConfig):
        super().__init__(num_embeddings, embedding_dim, init_method=_initialized_elsewhere, config=config)
        mark_tensor_parallel(self.weight, 0)


def vocab_parallel_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Tied head: this rank's vocabulary slice; the gradient of h is summed over the TP group."""
    return F.linear(tensor_parallel.copy_to_tensor_model_parallel_region(h), weight)


def vocab_parallel_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy over the whole (split) vocabulary, in float32."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


def _tensor_parallel_rng():
    return tensor_parallel.get_cuda_rng_tracker().fork()


def megatron_linears(tp_rank: int, tp_size: int, pp_size: int) -> Linears:
    """`Linears` for a model built inside initialized Megatron process groups.

    Parameters are fp32 masters whatever the training precision: DeepSpeed casts for bf16.
    """
    config = ModelParallelConfig(
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
        lm_logits=vocab_parallel_logits,
        cross_entropy=vocab_parallel_token_loss,
        tp_rng=_tensor_parallel_rng,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )
