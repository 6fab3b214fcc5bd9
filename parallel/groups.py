"""Process groups: Megatron-core's tensor/pipeline/context/data groups and the matching DeepSpeed topology.

Megatron orders ranks TP fastest, then CP, then DP, then PP (`rank = tp + TP * (cp + CP * (dp + DP *
pp))`); DeepSpeed's `PipeModelDataParallelTopology` has axes (pipe, data, model) with the last
fastest. DeepSpeed is not told of context parallelism: its data axis is CP x DP (index cp + CP * dp),
the ranks that hold the same parameters, so it averages gradients and partitions ZeRO over both,
which is what context parallelism needs. `init_parallel` builds both and checks, rank by rank, that
they agree, so a pipeline stage's tensor-parallel shards and replicas are the ones Megatron's
layers talk to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hippo.parallel.deepspeed_compat import quiet
from hippo.parallel.runtime import backend, bind_device, configure_cpu_threads, import_deepspeed
from hippo.parallel.layout import ParallelLayout


class MegatronMPU:
    """Megatron-core's parallel state in the shape DeepSpeed asks of an `mpu`.

    megatron-core lacks `get_model_parallel_*` (TP x PP), which DeepSpeed needs. Sequence-parallel
    getters are left out on purpose: their presence makes DeepSpeed assume Ulysses sequence
    parallelism and change what its data-parallel group means.
    """

    def __init__(self) -> None:
        from hippo.parallel.megatron_compat import parallel_state

        self.ps = parallel_state

    # DeepSpeed's "data parallel" is every replica of the parameters: data x context.
    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.ps.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.ps.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()


@dataclass(frozen=True)
class ParallelState:
    """This process's place in the layout, and the groups and topology built for it."""

    layout: ParallelLayout
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    """Rank among the data-parallel groups that read different data (the CP ranks of one group
    read the same sequences)."""
    device: torch.device
    topology: Any
    """DeepSpeed's `PipeModelDataParallelTopology` for the layout."""
    mpu: MegatronMPU
    cp_rank: int = 0
    """Which chunk of each sequence this rank holds."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pipeline - 1

    @property
    def tp_group(self):
        return self.mpu.get_tensor_model_parallel_group()

    @property
    def replica_group(self):
        """Every rank holding this rank's parameters (data x context): losses and gradients are
        averaged over it."""
        return self.mpu.get_data_parallel_group()

    @property
    def cp_group(self):
        return self.mpu.ps.get_context_parallel_group()


def init_parallel(layout: ParallelLayout, seed: int) -> ParallelState:
    """Join the job (env:// rendezvous from the launcher), build the groups, seed the RNGs."""
    deepspeed = import_deepspeed()
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from hippo.parallel.megatron_compat import parallel_state as ps

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    configure_cpu_threads()
    rank_device = bind_device(local_rank)
    if not dist.is_initialized():
        _init_process_group()
        with quiet():
            deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"layout is for {layout.world_size} ranks, but the job has {dist.get_world_size()}")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        context_parallel_size=layout.context,
    )
    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.replicas)
    rank = dist.get_rank()
    coord = topology.get_coord(rank)
    ours = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
    cp_rank = ps.get_context_parallel_rank()
    if (coord.model, coord.pipe, coord.data) != (ours[0], ours[1], cp_rank + layout.context * ours[2]):
        raise RuntimeError(f"rank {rank}: DeepSpeed topology {coord} disagrees with Megatron (tp, pp, dp, cp) = "
                           f"{(*ours, cp_rank)}")
    mpu = MegatronMPU()
    state = ParallelState(layout, rank, *ours, device=rank_device, topology=topology, mpu=mpu, cp_rank=cp_rank)
    seed_tensor_parallel_rng(mpu, seed)
    return state


def _init_process_group() -> None:
    """env:// rendezvous, with one change under torchrun: keys are prefixed by the restart attempt.

    torchrun (torch 2.13, c10d rendezvous) hands a restarted worker group the same agent store,
    which still holds the previous group's gloo addresses; the new ranks read those and fail to
    connect. A per-attempt prefix gives every attempt a clean key space.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return  # plain launchers: DeepSpeed's env:// initialization
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=timedelta(minutes=10))
    dist.init_process_group(backend(), store=dist.PrefixStore(f"hippo/attempt_{attempt}", store),
                            rank=rank, world_size=world)


def seed_tensor_parallel_rng(mpu: MegatronMPU, seed: int) -> None:
    """Seed the default generator (same on every rank) and a tensor-parallel one (per TP rank).

    Megatron's own tracker only works on CUDA; DeepSpeed's uses its accelerator's generator (the
    CPU one here). Hippo's layers fork DeepSpeed's directly (`tensor_parallel.tensor_parallel_rng`),
    so attention dropout on this rank's heads draws from the TP-rank stream on CPU and GPU, and
    DeepSpeed's activation checkpointing replays it exactly. Megatron's tracker is left alone: no
    Megatron code Hippo runs forks it (its layers are built with `use_cpu_initialization`).
    """
    deepspeed = import_deepspeed()
    deepspeed.checkpointing.configure(mpu)
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_parallel() -> None:
    from hippo.parallel.megatron_compat import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
