"""The torchrun helpers: joining and leaving the process group, and the sums, gathers and
broadcasts between its processes (each the value itself when a process is alone)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world size, local
    rank)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), world_size, local_rank


def close_distributed() -> None:
    """Leave the torchrun process group (exiting without this can abort in gloo's threads)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one of several under torchrun."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over every process (the tensor itself when alone)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather(obj: Any) -> list[Any]:
    """Every process's obj, in rank order ([obj] when alone)."""
    if not is_distributed():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast(obj: Any) -> Any:
    """Rank 0's value of obj on every process (obj itself when alone)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
