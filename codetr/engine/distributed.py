"""torch.distributed set-up for `torchrun`: NCCL on GPUs, gloo on CPUs; plain single process otherwise."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from codetr.errors import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "") -> DistInfo:
    """Join the process group that `torchrun` describes in the environment (if any) and pick a device.

    device: "" picks cuda:<local_rank> when CUDA is available, else cpu; "cuda" means cuda:<local_rank>.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
        if chosen.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N")
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
        if chosen.type == "cuda" and chosen.index is None:  # a bare "cuda": this rank's GPU
            chosen = torch.device("cuda", local_rank)
        if chosen.type == "cuda" and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif torch.cuda.is_available():
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, chosen)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(value):
    """[value of rank 0, value of rank 1, ...] on every rank ([value] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_from_main(value):
    """Rank 0's `value` on every rank, so that all ranks take the same decision."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
