"""One-step rules ``(x, s, t) -> x_t``: Euler, midpoint, Heun, RK4 and the flow-map jump.

Anything that moves samples is a step. A numerical rule is bound to a velocity field
``velocity(x, t, **model_kwargs)``; a learned flow map ``flow_map(x, s, t, **model_kwargs)`` is a
step by itself. ``s`` and ``t`` are times of shape ``[B]``; ``t < s`` integrates backwards.
Each rule declares its order of accuracy and its number of function evaluations (NFE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from flowmatch.shapes import broadcast_time
from flowmatch.types import TwoTimeField, VelocityField

Step = Callable[[Any, Tensor, Tensor, Tensor, dict[str, Any]], Tensor]
"""``step(field, x, s, t, model_kwargs) -> x_t``; ``field`` is a :class:`VelocityField` for the
numerical rules and a :class:`TwoTimeField` (a flow map) for ``flow_map_step``, so a table of
rules of both kinds types it ``Any``."""


def euler_step(
    velocity: VelocityField, x: Tensor, s: Tensor, t: Tensor, model_kwargs: dict[str, Any]
) -> Tensor:
    """``x + h v(x, s)``, ``h = t - s``."""
    h = broadcast_time(t - s, x)
    return x + h * velocity(x, s, **model_kwargs)


def midpoint_step(
    velocity: VelocityField, x: Tensor, s: Tensor, t: Tensor, model_kwargs: dict[str, Any]
) -> Tensor:
    """Explicit midpoint: ``x + h v(x + (h/2) v(x, s), s + h/2)``."""
    h = t - s
    hb = broadcast_time(h, x)
    x_mid = x + 0.5 * hb * velocity(x, s, **model_kwargs)
    return x + hb * velocity(x_mid, s + 0.5 * h, **model_kwargs)


def heun_step(
    velocity: VelocityField, x: Tensor, s: Tensor, t: Tensor, model_kwargs: dict[str, Any]
) -> Tensor:
    """Heun (explicit trapezoid): ``x + (h/2) (k1 + k2)``, ``k2 = v(x + h k1, t)``."""
    hb = broadcast_time(t - s, x)
    k1 = velocity(x, s, **model_kwargs)
    k2 = velocity(x + hb * k1, t, **model_kwargs)
    return x + 0.5 * hb * (k1 + k2)


def rk4_step(
    velocity: VelocityField, x: Tensor, s: Tensor, t: Tensor, model_kwargs: dict[str, Any]
) -> Tensor:
    """Classical fourth-order Runge-Kutta."""
    h = t - s
    hb = broadcast_time(h, x)
    s_mid = s + 0.5 * h
    k1 = velocity(x, s, **model_kwargs)
    k2 = velocity(x + 0.5 * hb * k1, s_mid, **model_kwargs)
    k3 = velocity(x + 0.5 * hb * k2, s_mid, **model_kwargs)
    k4 = velocity(x + hb * k3, t, **model_kwargs)
    return x + (hb / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)


def flow_map_step(
    flow_map: TwoTimeField, x: Tensor, s: Tensor, t: Tensor, model_kwargs: dict[str, Any]
) -> Tensor:
    """One jump of a flow map: ``X(x, s, t)``."""
    return flow_map(x, s, t, **model_kwargs)


@dataclass(frozen=True)
class StepRule:
    """A named step with its declared order and NFE per step."""

    name: str
    order: int
    nfe: int
    step: Step


STEP_RULES: dict[str, StepRule] = {
    rule.name: rule
    for rule in (
        StepRule("euler", 1, 1, euler_step),
        StepRule("midpoint", 2, 2, midpoint_step),
        StepRule("heun", 2, 2, heun_step),
        StepRule("rk4", 4, 4, rk4_step),
        StepRule("flow_map", 0, 1, flow_map_step),
    )
}
