"""Protocols shared by the library: velocity fields, flow maps, couplings, time samplers.

A velocity field is ``velocity(x, t, **model_kwargs) -> v`` with ``x: [B, *dims]``, ``t: [B]``.
A flow map is ``flow_map(x, s, t, **model_kwargs) -> X_{s,t}(x)`` with ``flow_map.velocity``
its diagonal, a velocity field, and ``flow_map.slope`` its average velocity ``v_{s,t}``. Any
``nn.Module`` whose ``forward`` has these signatures is a velocity field or two-time field
(``nn.Module.__call__`` is typed ``(...) -> Any``); ``FlowMapNet`` and ``GaussianOracle`` are
flow maps. Callers pass the state and times by position, but the names ``x``, ``s``, ``t`` are
part of the signature: a keyword argument of a model cannot take one of them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


class VelocityField(Protocol):
    """``v(x, t, **model_kwargs)``: the velocity at ``x: [B, *dims]``, time ``t: [B]``."""

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...


class TwoTimeField(Protocol):
    """``f(x, s, t, **model_kwargs)`` with ``s, t: [B]``: a flow map's jump ``X_{s,t}``, its slope
    ``v_{s,t}``, or any map from time ``s`` to time ``t`` (e.g. one Euler step of a velocity)."""

    def __call__(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...


@runtime_checkable
class FlowMap(Protocol):
    """``X(x, s, t)``: carries a state at time ``s`` to time ``t``; ``X(x, t, t) = x``.

    ``X_{s,t}(x) = x + (t - s) v_{s,t}(x)``: ``slope`` is ``v_{s,t}`` and ``velocity`` its
    diagonal ``v_{t,t}``, the instantaneous velocity of the flow.
    """

    def __call__(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...

    def slope(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...

    def velocity(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor: ...


class Coupling(Protocol):
    """Re-pairs a batch: returns ``x0`` reordered so that ``(x0[i], x1[i])`` is a coupled pair;
    ``condition`` (labels ``[B]`` or contexts ``[B, ...]`` aligned with ``x1``) makes the OT
    couplings condition-aware (:mod:`flowmatch.couplings`)."""

    def __call__(
        self,
        x0: Tensor,
        x1: Tensor,
        generator: torch.Generator | None = None,
        condition: Tensor | None = None,
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
