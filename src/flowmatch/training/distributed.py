"""Process setup for 1..N processes: torchrun detection, the process group, device choice.

``setup`` reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); with a
world size above 1 it joins the process group (nccl on CUDA, gloo on the CPU). A single process
runs the same code with ``world_size = 1`` and no group.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # True if ``setup`` created the process group (and teardown destroys it)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0


def world_size_from_env() -> int:
    """The number of processes torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto") -> DistContext:
    """Join the process group if launched by torchrun with several processes; pick the device.

    ``device="auto"`` is ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``"cuda"``
    also means the local rank's GPU.
    """
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        owns_group = True
    return DistContext(rank, local_rank, world_size, resolved, owns_group)


def teardown(ctx: DistContext) -> None:
    """Destroy the group ``setup`` created, after collecting the run's DDP wrapper: its reducer
    holds the group, and a gloo group released only at interpreter exit can abort the process."""
    if ctx.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def all_reduce_sum(tensor: Tensor, ctx: DistContext) -> Tensor:
    """The sum of ``tensor`` over all processes (a new tensor; the argument is unchanged)."""
    total = tensor.clone()
    if ctx.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
