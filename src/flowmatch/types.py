"""Protocols shared by the library: velocity fields, flow maps, couplings, time samplers.

A velocity field is ``velocity(x, t, **model_kwargs) -> v`` with ``x: [B, *dims]``, ``t: [B]``.
A flow map is ``flow_map(x, s, t, **model_kwargs) -> X_{s,t}(x)`` with ``flow_map.velocity``
its diagonal, a velocity field.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


class VelocityField(Protocol):
    def __call__(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...


@runtime_checkable
class FlowMap(Protocol):
    """``X(x, s, t)``: carries a state at time ``s`` to time ``t``; ``X(x, t, t) = x``."""

    def __call__(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...

    def velocity(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...


class Coupling(Protocol):
    """Re-pairs a batch: returns ``x0`` reordered so that ``(x0[i], x1[i])`` is a coupled pair."""

    def __call__(
        self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None
    ) -> Tensor: ...


class TimeSampler(Protocol):
    """Draws training times ``t: [n]`` in ``[0, 1]``."""

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor: ...
