"""Data parallelism with torch.distributed, set up from torchrun's environment variables.

``torchrun --nproc_per_node=N -m tcsm_kernels train ...`` starts N processes; each reads its
share of every global batch and DDP averages the gradients (gloo on CPU, nccl on GPU). With
``--vocab-parallel`` each rank instead reads the whole batch and holds a ``vocab_shard`` of the
LM head. Without torchrun (WORLD_SIZE unset) everything here is a no-op on one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (if any); on GPU each rank takes its local
    device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), size, device)


def teardown(world: World, finished: bool) -> None:
    """Leave the process group. After a finished run a barrier first keeps a rank from tearing
    down the store (rank 0 hosts it) while another still shuts its connections down, which
    under load aborted a rank at exit ("terminate called without an active exception"); after
    an error there is none (the other ranks may be inside another collective)."""
    if world.distributed and dist.is_initialized():
        try:
            if finished:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def mean(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks."""
    if world.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= world.size
    return tensor


def share_error(world: World, message: Optional[str]) -> Optional[str]:
    """Rank 0's error message (or None), sent to every rank, so that all of them stop together."""
    if not world.distributed:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def vocab_shard(vocab_size: int, rank: int, size: int) -> Tuple[int, int]:
    """Rows [start, end) of a vocabulary of ``vocab_size`` that rank ``rank`` of ``size`` holds:
    contiguous in rank order, ``vocab_size // size`` rows each and one more for the first
    ``vocab_size % size`` ranks."""
    base, extra = divmod(vocab_size, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_vocab_shards(world: World, shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every rank's ``vocab_shard`` rows (end - start, ...), concatenated in rank order into
    (vocab_size, ...). gloo's all_gather needs equal shapes: the shards are padded to the
    largest and trimmed."""
    if not world.distributed:
        return shard
    bounds = [vocab_shard(vocab_size, r, world.size) for r in range(world.size)]
    padded = shard.new_zeros((max(end - start for start, end in bounds),) + shard.shape[1:])
    padded[:len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(parts, padded)
    return torch.cat([part[:end - start] for part, (start, end) in zip(parts, bounds)])
