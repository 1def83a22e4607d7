"""The ``Workload`` record: what a run trains on and how it is measured."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Workload:
    """Data ``sample(n, generator) -> [n, *shape]``, the network every library trains,
    ``log_prob(x) -> [B]`` when the target density is known exactly (enables the NLL study) and
    the flow-map network flowmatch trains for few-step sampling, if any."""

    name: str
    sample: Callable[[int, torch.Generator | None], Tensor]
    make_net: Callable[[], nn.Module]
    shape: tuple[int, ...]
    log_prob: Callable[[Tensor], Tensor] | None = None
    make_flow_map: Callable[[], nn.Module] | None = None
    batch_sizes: tuple[int, ...] = (512, 4096)
    euler_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 100)

    def data_pool(self, steps: int, batch: int, seed: int) -> Tensor:
        """``[steps, batch, *shape]``: the batches of one training run, drawn once into memory
        and shared by every library (step ``k`` trains on ``pool[k]``)."""
        x = self.sample(steps * batch, torch.Generator().manual_seed(seed))
        return x.reshape(steps, batch, *x.shape[1:])
