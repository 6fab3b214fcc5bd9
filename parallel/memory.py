"""Per-rank memory of parameters, gradients and optimizer state for a layout, from the sharding
alone: each stage's layers are built on the meta device with linears of the shard's shape, so
the counts come from the same model code that trains, and nothing is allocated.

Bytes per parameter follow DeepSpeed's mixed-precision accounting: bf16 keeps bf16 weights and
gradients and an fp32 master copy plus Adam's two moments (12 bytes); fp32 keeps weights and
gradients in fp32 and the two moments (8 bytes). ZeRO-1 splits the optimizer bytes over the
replicas (data x context), ZeRO-2 the gradient bytes too.

Activations (`activation_bytes`, with a sequence length) are what autograd saves for backward,
per token and model channel, as measured with saved-tensor hooks on the model code
(`BLOCK_SAVED_BYTES`; tests/parallel/test_memory_estimate.py re-measures them), scaled by the
tokens a rank holds (micro batch x seq_len / context), the micro-batches in flight on a pipeline
stage (1F1B) and the layout's splits. Not counted: the allocator's fragmentation, temporary
buffers of one op (the peak inside a layer), and communication buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

from hippo.parallel.layout import ParallelLayout
from hippo.parallel.pipeline import layer_parameter_counts, shard_shaped_linears, stage_bounds
from hippo.pretrain.models.config import ModelConfig

GIB = 2**30


def stage_parameter_counts(cfg: ModelConfig, layout: ParallelLayout) -> list[int]:
    """Parameters one tensor-parallel rank of each pipeline stage holds (tied embedding counted
    on both end stages when they differ, as DeepSpeed keeps a copy on each)."""
    sizes = layer_parameter_counts(cfg, shard_shaped_linears(layout.tensor))
    bounds = stage_bounds(cfg, layout)
    counts = [sum(sizes[bounds[s] : bounds[s + 1]]) for s in range(layout.pipeline)]
    if layout.pipeline == 1:
        counts[0] -= sizes[-1]  # one stage: the head reuses the embedding's weight
    return counts


@dataclass(frozen=True)
class RankMemory:
    parameters: int
    """Parameters held by the busiest rank."""
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int

    activation_bytes: int = 0
    """Saved activations of the busiest rank (0: no sequence length given)."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes


def rank_memory(cfg: ModelConfig, layout: ParallelLayout, *, precision: str = "fp32", seq_len: int = 0) -> RankMemory:
    n = max(stage_parameter_counts(cfg, layout))
    weight, grad, optim = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    zero = layout.zero_stage
    optim_bytes = n * optim // (layout.replicas if zero >= 1 else 1)
    grad_bytes = n * grad // (layout.replicas if zero >= 2 else 1)
    acts = activation_bytes(cfg, layout, seq_len, precision=precision) if seq_len else 0
    return RankMemory(n, n * weight, grad_bytes, optim_bytes, acts)


BLOCK_SAVED_BYTES = {
    ("h3", "fp32"): 84, ("h3", "bf16"): 52,
    ("attention", "fp32"): 64, ("attention", "bf16"): 32,
    ("s4d", "fp32"): 88, ("s4d", "bf16"): 58,
}
"""Bytes autograd saves per token and per d_model channel for one block (norms, mixer, MLP), by
mixer and precision. H3 and S4D keep fp32 internals under bf16 (their cores compute in fp32).
Attention is SDPA's memory-efficient path (no L x L matrix). Eager (the CPU default): a compiled
S4D block's convolution is the `hippo::fftconv` op, which saves its inputs, not autograd's FFT
intermediates (measured 66 / 38), so the estimate is high for compiled S4D runs."""
REPLICATED_SAVED_ELEMENTS = 4
"""Of those, per channel and token, elements tensor parallelism does not split: the two norms'
inputs and outputs (the column-parallel maps' inputs)."""
HEAD_SAVED_BYTES_PER_VOCAB = 4
"""The loss's fp32 log-softmax, per token and (this rank's) vocabulary entry."""
HEAD_SAVED_BYTES_PER_CHANNEL = {"fp32": 8, "bf16": 4}
"""Embedding output and final norm, per token and channel."""


def activation_bytes(cfg: ModelConfig, layout: ParallelLayout, seq_len: int, *, precision: str = "fp32") -> int:
    """Saved activations of the busiest rank for one training step (see the module docstring).

    Under context parallelism a rank holds seq_len / context tokens, except that its attention
    layers also keep the gathered keys and values of every chunk up to its own: the last CP rank
    keeps the whole sequence's (2 x seq_len x d_model / tensor elements per attention layer).
    With activation checkpointing each block keeps only its input, plus one block recomputed.
    """
    element = 2 if precision == "bf16" else 4
    tokens = layout.micro_batch_size * seq_len // layout.context
    d, tp = cfg.d_model, layout.tensor

    def block(mixer: str) -> int:
        per_channel = BLOCK_SAVED_BYTES[(mixer, precision)]
        replicated = REPLICATED_SAVED_ELEMENTS * element
        full = tokens * d * (replicated + (per_channel - replicated) / tp)
        if mixer == "attention" and layout.context > 1:  # the gathered K and V, on the last CP rank
            full += 2 * layout.micro_batch_size * seq_len * d / tp * element
        return int(full)

    mixers = cfg.layer_mixers
    bounds = stage_bounds(cfg, layout) if layout.pipeline > 1 else [0, cfg.n_layer + 3]
    worst = 0
    for stage in range(layout.pipeline):
        # The layer list is embedding, blocks 0 .. n-1, final norm, head: block i is item i + 1.
        layers = [mixers[i - 1] for i in range(bounds[stage], bounds[stage + 1]) if 1 <= i <= cfg.n_layer]
        if layout.activation_checkpointing and layers:
            kept = len(layers) * tokens * d * element + max(block(m) for m in layers)
        else:
            kept = sum(block(m) for m in layers)
        in_flight = min(layout.pipeline - stage, layout.grad_accum_steps)  # 1F1B: stage s holds PP - s
        total = kept * in_flight
        if stage == layout.pipeline - 1:  # embedding (first stage) + head: counted once, on the last
            total += tokens * (HEAD_SAVED_BYTES_PER_VOCAB * cfg.padded_vocab_size // tp
                               + HEAD_SAVED_BYTES_PER_CHANNEL[precision] * d)
        worst = max(worst, total)
    return worst
