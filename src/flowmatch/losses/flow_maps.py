"""Flow-map losses: distillation from a teacher velocity, self-distillation and MeanFlow.

This module owns the per-sample residual losses for a two-time flow map
``X_{s,t}(x) = x + (t - s) v_{s,t}(x)`` (Boffi, Albergo & Vanden-Eijnden 2024, eq. 4.1, and
2025, eq. 6; ``v`` is MeanFlow's average velocity, Geng et al. 2025, up to the time reversal), the
time derivatives they need (one ``torch.func.jvp`` each) and the learned two-time loss weight.

A flow map is ``flow_map(x, s, t, **model_kwargs)`` with ``flow_map.slope(x, s, t)`` = ``v_{s,t}``
and ``flow_map.velocity(x, t)`` = ``v_{t,t}``; a teacher is a velocity ``teacher(x, t, **kw)``.
Every loss takes points ``x_s = I_s`` of the interpolant and times ``s, t: [B]`` drawn by the
caller, draws no randomness, and returns ``[B]``, the squared residual averaged over the non-batch
dimensions. Targets marked ``sg`` are computed under ``torch.no_grad`` (the semigradient losses
of Boffi et al. 2024, Sec. 3, and the stop-gradients of Boffi et al. 2025, eq. 94): no gradient
reaches a teacher's parameters or its input point. The network calls that make up one residual
(value, derivative and a self-distillation target) run under :class:`SharedRandomness`: they draw
the same dropout masks, so all are those of one sub-network. A teacher that an objective froze
is in eval mode and draws none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from flowmatch.nets.embeddings import SinusoidalTimeEmbedding
from flowmatch.shapes import broadcast_time
from flowmatch.types import FlowMap, TwoTimeField, VelocityField

_T = TypeVar("_T")


def _global_rng_states(device: torch.device) -> list[Tensor]:
    """The states of the CPU generator and, for an accelerator, of ``device``'s generator."""
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device).get_rng_state(device))
    return states


def _set_global_rng_states(device: torch.device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type != "cpu":
        torch.get_device_module(device).set_rng_state(states[1], device)


class SharedRandomness:
    """Calls that draw the same numbers from the global generators, which dropout draws from.

    ``with SharedRandomness(x.device) as shared: a = shared(f, x); b = shared(g, y)``: every call
    starts from the state that the CPU generator and ``device``'s (CUDA, ...) had on entry, and
    on exit they are left as the first call left them. A group thus advances the global RNG as
    one call does: later draws, and a run's reproducibility from its seeds, do not depend on how
    many calls a loss makes; a group of one call changes nothing. Calls of one network on inputs
    of one shape apply the same dropout masks (an eager and a compiled call draw differently).
    Saving a state copies a few kilobytes (the CPU generator's; an accelerator's is a seed and an
    offset), so it is done whether or not the calls draw. Groups nest: an inner group counts as
    one call.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._start: list[Tensor] = []
        self._after_first: list[Tensor] | None = None

    def __enter__(self) -> SharedRandomness:
        self._start, self._after_first = _global_rng_states(self.device), None
        return self

    def __call__(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` from the entry state."""
        if self._after_first is not None:
            _set_global_rng_states(self.device, self._start)
        result = fn(*args, **kwargs)
        if self._after_first is None:
            self._after_first = _global_rng_states(self.device)
        return result

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._after_first is not None:
            _set_global_rng_states(self.device, self._after_first)


def _mean_square(residual: Tensor) -> Tensor:
    """``mean over non-batch dims of residual^2``: ``[B]``."""
    return residual.pow(2).flatten(1).mean(1)


@dataclass
class Derivative:
    """``value = f(x, s, t)`` and its derivative along a tangent ``(dx, ds, dt)``: ``[B, ...]``."""

    value: Tensor
    derivative: Tensor


TimeDerivative = Literal["jvp", "finite_difference"]


def directional_derivative(
    fn: TwoTimeField,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    dx: Tensor | None = None,
    ds: Tensor | None = None,
    dt: Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
    step: float = 1e-3,
    tangent_graph: bool = True,
    value_graph: bool = True,
) -> Derivative:
    """``f(x, s, t)`` and ``d/de f(x + e dx, s + e ds, t + e dt)`` at ``e = 0``.

    ``method="jvp"``: one forward-mode pass (``torch.func.jvp``); ``"finite_difference"``: the
    central difference ``(f(p + h d) - f(p - h d)) / 2h`` with ``h = step`` (error ``O(h^2)``),
    for networks whose kernels have no forward-mode derivative (some fused attention). With
    ``tangent_graph=False`` the derivative is computed without an autograd graph (for targets
    under stop-gradient: less memory); the value keeps its graph unless ``value_graph=False``
    (for a value used only under stop-gradient: returned detached, and the finite difference
    reads it off its two calls' midpoint ``(f(p + h d) + f(p - h d)) / 2``, error ``O(h^2)``,
    saving the third call). The calls of these options share dropout masks
    (:class:`SharedRandomness`), as a JVP's one call does. Only the arguments given a tangent are
    differentiated. Examples: ``dt = 1`` gives ``d_t X_{s,t}``; ``dx = b, ds = 1`` gives ``(d_s +
    b . grad) f``.
    """
    kw = model_kwargs or {}
    primals = {"x": x, "s": s, "t": t}
    tangents = {name: v for name, v in (("x", dx), ("s", ds), ("t", dt)) if v is not None}
    if not tangents:
        raise ValueError("give at least one of dx, ds, dt")
    names = tuple(tangents)

    def restricted(*args: Tensor) -> Tensor:
        a = {**primals, **dict(zip(names, args, strict=True))}
        return fn(a["x"], a["s"], a["t"], **kw)

    points = tuple(primals[n] for n in names)
    directions = tuple(tangents[n] for n in names)

    def moved(h: float) -> Tensor:
        return restricted(*(p + h * d for p, d in zip(points, directions, strict=True)))

    if method not in ("jvp", "finite_difference"):
        raise ValueError(f"method must be jvp or finite_difference, got {method!r}")
    # Without a tangent graph, no graph; with one, the caller's grad mode (an outer no_grad holds).
    tangent_mode = contextlib.nullcontext() if tangent_graph else torch.no_grad()
    if method == "jvp" and (tangent_graph or not value_graph):
        with tangent_mode:
            # torch types the result as a 2- or a 3-tuple (the latter with has_aux=True).
            value, derivative = torch.func.jvp(restricted, points, directions)[:2]
        return Derivative(value=value if value_graph else value.detach(), derivative=derivative)
    with SharedRandomness(x.device) as shared:
        if method == "jvp":
            with torch.no_grad():
                derivative = shared(torch.func.jvp, restricted, points, directions)[1]
            return Derivative(value=shared(restricted, *points), derivative=derivative)
        value = shared(restricted, *points) if value_graph else None
        with tangent_mode:
            ahead, behind = shared(moved, step), shared(moved, -step)
    if value is None:
        value = (0.5 * (ahead + behind)).detach()
    return Derivative(value=value, derivative=(ahead - behind) / (2.0 * step))


def lagrangian_map_distillation_loss(
    flow_map: TwoTimeField,
    teacher: VelocityField,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
) -> Tensor:
    """LMD, semigradient (Boffi et al. 2024, Cor. 3.7).

    ``r = d_t X_{s,t}(x_s) - b_t(sg X_{s,t}(x_s))``: the teacher runs at the transported point and
    the end time ``t``, on a detached input and without gradient. Zero iff ``X`` is ``b``'s flow.
    """
    kw = model_kwargs or {}
    with SharedRandomness(x_s.device) as shared:
        lagrangian = shared(
            directional_derivative,
            flow_map,
            x_s,
            s,
            t,
            dt=torch.ones_like(t),
            model_kwargs=kw,
            method=method,
            value_graph=False,
        )
        with torch.no_grad():
            target = shared(teacher, lagrangian.value, t, **kw)
    return _mean_square(lagrangian.derivative - target)


def eulerian_map_distillation_loss(
    flow_map: TwoTimeField,
    teacher: VelocityField,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
) -> Tensor:
    """EMD, semigradient (Boffi et al. 2024, Sec. 3).

    ``r = d_s X_{s,t}(x_s) + sg(grad_x X_{s,t}(x_s) b_s(x_s))``: the teacher runs at the start point
    and time ``s``; the gradient flows through ``d_s X`` only (two JVPs, the second without graph).
    """
    kw = model_kwargs or {}

    def derivative(dx: Tensor | None = None, ds: Tensor | None = None) -> Derivative:
        return directional_derivative(
            flow_map, x_s, s, t, dx=dx, ds=ds, model_kwargs=kw, method=method, value_graph=False
        )

    with SharedRandomness(x_s.device) as shared:
        d_s = shared(derivative, ds=torch.ones_like(s))
        with torch.no_grad():
            b = shared(teacher, x_s, s, **kw)
            transport = shared(derivative, dx=b)
    return _mean_square(d_s.derivative + transport.derivative)


def progressive_map_distillation_loss(
    flow_map: TwoTimeField,
    teacher_map: TwoTimeField,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """PFMM, progressive flow map matching (Boffi et al. 2024) with K = 2 teacher jumps.

    ``r = X_{s,t}(x_s) - sg(Xt_{u,t}(Xt_{s,u}(x_s)))``, ``u = (s + t) / 2``, with ``Xt`` a frozen
    teacher flow map valid for ``|t - s| / 2`` (initially one Euler step of a teacher velocity).
    """
    kw = model_kwargs or {}
    with torch.no_grad():
        u = 0.5 * (s + t)
        target = teacher_map(teacher_map(x_s, s, u, **kw), u, t, **kw)
    return _mean_square(flow_map(x_s, s, t, **kw) - target)


def lagrangian_self_distillation_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
) -> Tensor:
    """LSD (Boffi et al. 2025, Prop. 2.3, with the stop-gradients of eq. 94).

    ``r = d_t X_{s,t}(x_s) - sg(v_{t,t}(sg X_{s,t}(x_s)))``: LMD whose teacher is the map's own
    diagonal ``v_{t,t}`` at the current parameters.
    """
    velocity = flow_map.velocity
    return lagrangian_map_distillation_loss(flow_map, velocity, x_s, s, t, model_kwargs, method)


def fused_lsd_losses(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    diagonal_velocity: Tensor,
    model_kwargs: dict[str, Any] | None = None,
    step: float = 1e-3,
) -> Tensor:
    """``L_b`` of the first ``n = len(diagonal_velocity)`` samples (``s = t``) and LSD's residual
    of the rest by a central difference, in two network calls: ``[B]``.

    One call of ``flow_map.slope`` on ``n + 2m`` rows gives the diagonal velocities ``v_{s,s}``
    and both shifted maps ``X_{s,t +- h}(x_s)`` of the ``m`` off-diagonal samples; a second,
    under ``no_grad``, the target ``sg(v_{t,t}(sg X_{s,t}))`` with ``X_{s,t}`` their midpoint.
    These are :func:`diagonal_flow_matching_loss` and ``lagrangian_self_distillation_loss(...,
    method="finite_difference")`` up to rounding, at two calls instead of four (small networks
    spend most of a step on each call's fixed cost). Only for a network that draws no random
    numbers: one call of a network with dropout gives the two shifted maps different masks.
    ``RuntimeError`` if the call moved a global generator.
    """
    kw = model_kwargs or {}
    n = diagonal_velocity.shape[0]
    x_off, s_off, t_off = x_s[n:], s[n:], t[n:]
    m = x_off.shape[0]
    before = _global_rng_states(x_s.device)
    slopes = flow_map.slope(
        torch.cat([x_s, x_off]),
        torch.cat([s, s_off]),
        torch.cat([t[:n], t_off + step, t_off - step]),
        **{k: torch.cat([v, v[n:]]) for k, v in kw.items()},
    )
    after = _global_rng_states(x_s.device)
    if any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        raise RuntimeError(
            "the network draws random numbers (dropout?): its shifted maps need separate calls "
            "that share them; use lagrangian_self_distillation_loss"
        )
    diagonal, slope_ahead, slope_behind = slopes.split([n, m, m])
    losses = [_mean_square(diagonal - diagonal_velocity)]
    if m > 0:
        ahead = x_off + broadcast_time(t_off + step - s_off, x_off) * slope_ahead
        behind = x_off + broadcast_time(t_off - step - s_off, x_off) * slope_behind
        with torch.no_grad():
            kw_off = {k: v[n:] for k, v in kw.items()}
            target = flow_map.velocity(0.5 * (ahead + behind), t_off, **kw_off)
        losses.append(_mean_square((ahead - behind) / (2.0 * step) - target))
    return torch.cat(losses)


def eulerian_self_distillation_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
) -> Tensor:
    """ESD, Eulerian self-distillation (Boffi et al. 2025, Prop. 2.3).

    ``r = d_s X_{s,t}(x_s) + sg(grad_x X_{s,t}(x_s) v_{s,s}(x_s))``: EMD whose teacher is the map's
    own diagonal.
    """
    velocity = flow_map.velocity
    return eulerian_map_distillation_loss(flow_map, velocity, x_s, s, t, model_kwargs, method)


def progressive_self_distillation_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    gamma: Tensor,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """PSD, preconditioned slope residual (Boffi et al. 2025, Alg. 4).

    ``u = gamma s + (1 - gamma) t``; ``r = v_{s,t}(x_s) - sg((1 - gamma) v_{s,u}(x_s)
    + gamma v_{u,t}(X_{s,u}(x_s)))``: the semigroup ``X_{s,t} = X_{u,t} o X_{s,u}`` divided by
    ``t - s``. ``gamma: [B]`` is 1/2 for PSD-M and ``U[0, 1]`` for PSD-U.
    """
    kw = model_kwargs or {}
    u = gamma * s + (1.0 - gamma) * t
    g = broadcast_time(gamma, x_s)
    with SharedRandomness(x_s.device) as shared:
        with torch.no_grad():
            v_su = shared(flow_map.slope, x_s, s, u, **kw)
            x_u = x_s + broadcast_time(u - s, x_s) * v_su
            target = (1.0 - g) * v_su + g * shared(flow_map.slope, x_u, u, t, **kw)
        v_st = shared(flow_map.slope, x_s, s, t, **kw)
    return _mean_square(v_st - target)


def diagonal_flow_matching_loss(
    flow_map: FlowMap,
    x_t: Tensor,
    t: Tensor,
    target_velocity: Tensor,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """``L_b`` on the diagonal (Boffi et al. 2025, Prop. 2.3): ``r = v_{t,t}(I_t) - dI_t/dt``."""
    kw = model_kwargs or {}
    return _mean_square(flow_map.velocity(x_t, t, **kw) - target_velocity)


def adaptive_weight(squared_error: Tensor, power: float = 1.0, eps: float = 1e-3) -> Tensor:
    """MeanFlow's weight ``sg(1 / (squared_error + eps)^power)`` (Geng et al. 2025): ``[B]``."""
    return (squared_error.detach() + eps).pow(-power)


def adaptively_weighted(squared_error: Tensor, power: float = 1.0, eps: float = 1e-3) -> Tensor:
    """``adaptive_weight(squared_error) squared_error``: MeanFlow's weighted loss ``[B]``."""
    return adaptive_weight(squared_error, power, eps) * squared_error


def meanflow_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    velocity: Tensor,
    power: float = 1.0,
    eps: float = 1e-3,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
    tangent_graph: bool = True,
) -> Tensor:
    """MeanFlow (Geng et al. 2025, eqs. 6, 9, 10) written in flowmatch time (t = 0 noise).

    Along a trajectory, ``(t - s) v_{s,t}(x_s) = x_t - x_s``; differentiating in ``s`` gives the
    identity ``v_{s,t}(x_s) = b_s(x_s) + (t - s) d/ds v_{s,t}(x_s)``, ``d/ds = d_s + b_s . grad_x``
    (MeanFlow's ``u = v - (t - r) du/dt`` under ``u(z, r, t) = -v_{1-t, 1-r}(z)``). Training uses
    the conditional velocity ``velocity = dI_s/ds`` for ``b_s`` (the target is affine in it):
    ``D = sg(v_{s,t} - velocity - (t - s) jvp(v, (x, s, t), (velocity, 1, 0)))``, loss
    ``adaptive_weight(|D|^2) |D|^2`` with ``|D|^2`` averaged over dimensions (the paper sums).
    ``method`` computes the time derivative; the target is under ``sg``, so with
    ``tangent_graph=False`` it is computed without an autograd graph (less memory, one more
    forward pass).
    """
    mean_flow = directional_derivative(
        flow_map.slope,
        x_s,
        s,
        t,
        dx=velocity,
        ds=torch.ones_like(s),
        model_kwargs=model_kwargs,
        method=method,
        tangent_graph=tangent_graph,
    )
    target = velocity + broadcast_time(t - s, x_s) * mean_flow.derivative.detach()
    squared_error = _mean_square(mean_flow.value - target)
    return adaptively_weighted(squared_error, power, eps)


class LearnedLossWeight(nn.Module):
    """Learned two-time log-variance weight ``w_{s,t}`` (Boffi et al. 2025, 4.3; EDM2 style).

    ``w = MLP([emb(s), emb(t - s)])`` with sinusoidal embeddings; ``weigh`` returns
    ``exp(-w) L + w``, minimised at ``w = log L``. The output layer starts at zero (``w = 0``).
    """

    def __init__(self, embed_dim: int = 32, hidden: int = 64, time_scale: float = 100.0) -> None:
        super().__init__()
        self.embed = SinusoidalTimeEmbedding(embed_dim, scale=time_scale)
        hidden_layer, output_layer = nn.Linear(2 * embed_dim, hidden), nn.Linear(hidden, 1)
        nn.init.zeros_(output_layer.weight)
        nn.init.zeros_(output_layer.bias)
        self.net = nn.Sequential(hidden_layer, nn.SiLU(), output_layer)

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        """``w_{s,t}: [B]``."""
        return self.net(self.embed(torch.stack([s, t - s], dim=-1))).squeeze(-1)

    def weigh(self, loss: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """``exp(-w_{s,t}) loss + w_{s,t}``: ``[B]``."""
        w = self.forward(s, t)
        return torch.exp(-w) * loss + w
