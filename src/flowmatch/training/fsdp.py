"""Fully sharded data parallelism (``train.parallel=fsdp``): FSDP2 sharding, a sharded EMA and
sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

The loop wraps the model and the objective in one module and :func:`shard` applies
``torch.distributed.fsdp.fully_shard`` to it as one unit (Zhao et al. 2023, PyTorch FSDP): every
parameter is a ``DTensor`` whose dim-0 shard lives on one process; the forward all-gathers the
parameters, the backward reduce-scatters the gradients, and AdamW and the EMA keep only their
shards. One unit, not one per block: objectives call a flow map's own methods (``slope``,
``velocity``) and ``torch.func.jvp`` through them, which bypass the forward hooks of the model
itself, so all parameters stay gathered for the whole objective call.

A checkpoint of step ``k`` is two entries in ``checkpoints/``: the folder ``ckpt-k.dcp`` that
every process writes its shards of the model, objective, optimizer and EMA to (a filesystem all
nodes share), then the file ``ckpt-k.safetensors`` that rank 0 writes last, in the format of
:mod:`flowmatch.training.checkpoint` with the full EMA (gathered), the step, the config, the log
window and a non-module objective's state, and no model or optimizer tensors. The file marks the
folder complete, so a run killed while writing shards resumes from the checkpoint before;
``load_checkpoint`` and everything reading a run's EMA read the file as for any run, and a
resumed run loads the shards from the folder (DCP reshards them if the number of processes
changed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from flowmatch.training.checkpoint import CheckpointError, sharded_path


def shard(module: nn.Module, precision: str) -> nn.Module:
    """Rank 0's weights on every process, then ``fully_shard(module)``; with
    ``precision="bf16"`` the gathered parameters are bf16 and the gradients are reduced in fp32
    (the sharded parameters and the optimizer state stay fp32)."""
    low = torch.bfloat16 if precision == "bf16" else None
    # The loop's inputs (data, the generator) pass unchanged: autocast casts at each op.
    policy = MixedPrecisionPolicy(
        param_dtype=low, reduce_dtype=torch.float32 if low else None, cast_forward_inputs=False
    )
    with torch.no_grad():  # the same initial weights on every process, as DDP does
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
    fully_shard(module, mp_policy=policy)  # in place: the module becomes an FSDPModule too
    return module


def local(tensor: Tensor) -> Tensor:
    """This process's shard of ``tensor`` (the tensor itself if it is not a ``DTensor``)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedEMA:
    """The EMA of a sharded model (same update as :class:`~flowmatch.training.ema.EMA`), kept
    as ``DTensor`` shards laid out like the parameters: each process averages its own shard.

    ``module`` holds the full EMA weights on rank 0 after :meth:`gather` (validation, the end of
    training); it is a copy of ``model`` taken before sharding, on the CPU of rank 0 and on the
    meta device (no memory) elsewhere.
    """

    def __init__(
        self, model: nn.Module, template: nn.Module, decay: float, warmup: bool, is_main: bool
    ) -> None:
        self.decay, self.warmup = decay, warmup
        self.module = template.to("cpu" if is_main else "meta").eval().requires_grad_(False)
        self._is_main = is_main
        # Named as in ``model.state_dict()``, so that the full EMA loads into the model.
        entries = model.state_dict(keep_vars=True)
        is_param = {id(p) for p in model.parameters()}
        with torch.no_grad():
            self._params = {n: t.detach().clone() for n, t in entries.items() if id(t) in is_param}
            self._sources = [local(entries[n].detach()) for n in self._params]
            self._targets = [local(t) for t in self._params.values()]
        self._buffers = {n: t.detach() for n, t in entries.items() if id(t) not in is_param}
        self._buffer_copies = {n: b.clone() for n, b in self._buffers.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self._targets, self._sources, 1.0 - self.decay_at(step))
        for name, buffer in self._buffers.items():
            self._buffer_copies[name].copy_(buffer)

    def state_dict(self) -> dict[str, Tensor]:
        """The sharded state (``DTensor`` parameters, replicated buffers), for DCP."""
        return {**self._params, **self._buffer_copies}

    def local_tensors(self) -> list[Tensor]:
        return [*self._targets, *self._buffer_copies.values()]

    def full_state_dict(self) -> dict[str, Tensor]:
        """The full EMA weights on rank 0's CPU, ``{}`` elsewhere (a collective: every process
        must call it; one tensor at a time is gathered on the others)."""
        full = {}
        for name, value in self.state_dict().items():
            gathered = value.full_tensor() if isinstance(value, DTensor) else value
            if self._is_main:
                full[name] = gathered.cpu()
        return full

    def gather(self) -> None:
        """Refresh ``module`` on rank 0 from the shards (a collective)."""
        full = self.full_state_dict()
        if self._is_main:
            self.module.load_state_dict(full)


def save_sharded(
    path: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA
) -> None:
    """Every process writes its shards of the training state to ``sharded_path(path)``."""
    model_state, optimizer_state = get_state_dict(wrapped, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "ema": ema.state_dict()}
    dcp.save(state, checkpoint_id=sharded_path(path))


def load_sharded(
    path: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, ema: ShardedEMA
) -> None:
    """Load the shards of ``sharded_path(path)`` into the model, optimizer and EMA in place."""
    folder = sharded_path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{path} has no sharded state {folder.name}: a train.parallel=fsdp run resumes "
            "from the folder every process wrote"
        )
    model_state, optimizer_state = get_state_dict(wrapped, optimizer)
    state: dict[str, Any] = {
        "model": model_state,
        "optimizer": optimizer_state,
        "ema": ema.state_dict(),
    }
    try:
        dcp.load(state, checkpoint_id=folder)
    except (RuntimeError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{folder} does not fit this model or optimizer: {reason}") from None
    set_state_dict(
        wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
