"""Few-step flow-map families of 2024-2025: shortcut models, SplitMeanFlow, iMF and alpha-Flow.

This module owns their loss kernels and training objectives, written for a two-time flow map
``X_{s,t}(x) = x + (t - s) v_{s,t}(x)`` in flowmatch time (``t = 0`` noise, ``t = 1`` data; see
:mod:`flowmatch.nets.flow_map`). Papers that put noise at ``t = 1`` (MeanFlow and its successors)
write an average velocity ``u(z, r, t)``, ``r < t``, for the jump from the noisier time ``t`` to
``r``; in flowmatch time that is ``u(z, r, t) = -v_{1-t, 1-r}(z)``: their start ``t`` is our
``s = 1 - t``, their end ``r`` our ``t = 1 - r``, and their gap ``t - r`` is our ``t - s``.

Kernels take interpolant points ``x_s: [B, ...]`` and times ``[B]`` drawn by the caller, draw no
randomness and return the squared residual ``[B]`` averaged over the non-batch dimensions;
targets marked ``sg`` carry no gradient. Objectives follow the training loop's interface
``objective(model, batch, step, generator) -> loss [B]``: they draw the path's noise, the time
pairs and any extra randomness from ``generator`` in that order, pass ``batch["y"]`` to the
model as ``y`` when present, and hold all their state in ``state_dict`` (the optional learned
loss weight; nothing else).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowmatch.losses.flow_map_objectives import _diagonal_then_off, _FlowMapObjective, _rows
from flowmatch.losses.flow_maps import (
    _mean_square,
    adaptive_weight,
    diagonal_flow_matching_loss,
    directional_derivative,
    meanflow_loss,
    progressive_self_distillation_loss,
)
from flowmatch.paths.affine import AffinePath
from flowmatch.paths.time_pairs import DiagonalSplitTimePairs, LogitNormalTimePairs, TimePairs
from flowmatch.shapes import broadcast_time
from flowmatch.types import FlowMap

TimePairSampler = Callable[..., TimePairs]


def shortcut_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    d: Tensor,
    teacher_gap: Tensor,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Shortcut self-consistency (Frans, Hafner, Levine, Abbeel 2024, Sec. 3, eqs. 4-5).

    The paper's shortcut ``s(x_t, t, d)`` (same time convention as flowmatch) is the slope
    ``v_{t, t+d}``; its self-consistency ``s(x_t, t, 2d) = s(x_t, t, d) / 2 + s(x'_{t+d}, t + d,
    d) / 2`` with ``x'_{t+d} = x_t + d s(x_t, t, d)`` is the semigroup ``X_{s,s+2d} =
    X_{s+d,s+2d} o X_{s,s+d}`` divided by ``2d``. With ``g = teacher_gap`` (``d``, or 0 where the
    teacher half-steps are Euler steps of the diagonal ``v_{u,u}``, the paper's finest level):

    ``v1 = v_{s,s+g}(x_s)``, ``x_mid = x_s + d v1``, ``v2 = v_{s+d,s+d+g}(x_mid)``,
    ``r = v_{s,s+2d}(x_s) - sg((v1 + v2) / 2)``. ``d, teacher_gap: [B]``. No JVP.
    """
    kw = model_kwargs or {}
    with torch.no_grad():
        first = flow_map.slope(x_s, s, s + teacher_gap, **kw)
        x_mid = x_s + broadcast_time(d, x_s) * first
        second = flow_map.slope(x_mid, s + d, s + d + teacher_gap, **kw)
        target = 0.5 * (first + second)
    return _mean_square(flow_map.slope(x_s, s, s + 2.0 * d, **kw) - target)


def improved_meanflow_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    velocity: Tensor,
    power: float = 1.0,
    eps: float = 1e-2,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Improved MeanFlow's v-loss through the average velocity (Geng, Lu et al. 2025, iMF).

    MeanFlow's identity ``u = v - (t - r) du/dt`` (Geng et al. 2025, eq. 6), read as a
    prediction of the instantaneous velocity, is ``V = u + (t - r) sg(du/dt)`` regressed on the
    conditional velocity, with the JVP tangent the network's own predicted velocity rather than
    the conditional one (iMF, Sec. 4; official code: ``jvp(u, (z, t, r), (v_pred, 1, 0))``). In
    flowmatch time (``u(z, r, t) = -v_{1-t,1-r}(z)``, ``d/dt_MF = -d/ds``) this is

    ``V = v_{s,t}(x_s) - (t - s) sg((d_s + b . grad_x) v_{s,t}(x_s))``, ``b = sg v_{s,s}(x_s)``,

    equal to ``b_s(x_s)`` at the exact map. The loss is ``w(|V - velocity|^2) |V - velocity|^2 +
    w(|v_{s,s} - velocity|^2) |v_{s,s} - velocity|^2`` with ``w = adaptive_weight(., power,
    eps)`` (iMF's defaults ``p = 1``, ``eps = 0.01``); the second term is iMF's auxiliary
    v-head loss, here the flow map's diagonal, which also supplies the tangent. ``velocity =
    dI_s/ds: [B, ...]``; squares are averaged over dimensions (the paper sums). One JVP.
    """
    kw = model_kwargs or {}
    diagonal = flow_map.velocity(x_s, s, **kw)
    mean_flow = directional_derivative(
        flow_map.slope, x_s, s, t, dx=diagonal.detach(), ds=torch.ones_like(s), model_kwargs=kw
    )
    compound = mean_flow.value - broadcast_time(t - s, x_s) * mean_flow.derivative.detach()
    u_error = _mean_square(compound - velocity)
    v_error = _mean_square(diagonal - velocity)
    return (
        adaptive_weight(u_error, power, eps) * u_error
        + adaptive_weight(v_error, power, eps) * v_error
    )


def alpha_flow_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    velocity: Tensor,
    alpha: float,
    eps: float = 1e-3,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """alpha-Flow (Zhang et al. 2025, arXiv 2510.20771; the official ``AlphaFlowLoss``).

    In MeanFlow time the target is ``u_tgt = alpha v + (1 - alpha) u(z_t - alpha (t - r) v, r,
    t - alpha (t - r))`` with the conditional velocity ``v``: ``alpha = 1`` is trajectory flow
    matching, ``alpha -> 0`` MeanFlow. In flowmatch time, with ``u = s + alpha (t - s)`` and
    ``velocity = dI_s/ds``:

    ``r = v_{s,t}(x_s) - sg(alpha velocity + (1 - alpha) v_{u,t}(x_s + alpha (t - s) velocity))``,

    loss ``alpha adaptive_weight(|r|^2, 1, eps) |r|^2`` (the code's weight ``alpha / (|r|^2 +
    eps)``, which keeps the gradient's scale as ``r = O(alpha)``). At ``alpha = 0`` it is
    :func:`~flowmatch.losses.flow_maps.meanflow_loss` (one JVP, weight ``1 / (|D|^2 + eps)``).
    With the exact ``b_s`` for ``velocity`` the residual at the exact map is ``O(alpha^2 (t -
    s))`` (an Euler step stands in for the flow over ``alpha (t - s)``): consistent as ``alpha
    -> 0`` only. ``alpha`` is one float for the batch.
    """
    if alpha == 0.0:
        return meanflow_loss(flow_map, x_s, s, t, velocity, 1.0, eps, model_kwargs)
    kw = model_kwargs or {}
    with torch.no_grad():
        target = alpha * velocity
        if alpha < 1.0:
            gap = t - s
            x_u = x_s + broadcast_time(alpha * gap, x_s) * velocity
            target = target + (1.0 - alpha) * flow_map.slope(x_u, s + alpha * gap, t, **kw)
    squared_error = _mean_square(flow_map.slope(x_s, s, t, **kw) - target)
    return alpha * adaptive_weight(squared_error, 1.0, eps) * squared_error


@dataclass(frozen=True)
class ShortcutTimePairs:
    """Shortcut models' pairs on ``[t_min, t_max]`` (Frans et al. 2024, Sec. 3.2; official code).

    The last ``floor(self_consistency_fraction n)`` pairs have gap ``2d = 2^-k`` (times the span),
    ``k`` uniform in ``0 .. log2(1 / min_step) - 1`` (so ``2d`` runs from ``2 min_step`` to 1),
    and ``s`` uniform on the grid of multiples of ``2d`` below 1, so ``t = s + 2d`` stays in the
    range and the jumps of a ``1 / 2d``-step sampler are the ones trained. The others are
    diagonal pairs ``s = t ~ U`` (flow matching at ``d = 0``). ``1 / min_step`` must be a power of
    2 of at least 2; the paper uses ``min_step = 1/128`` and a quarter of the batch.
    """

    self_consistency_fraction: float = 0.25
    min_step: float = 1.0 / 128.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.self_consistency_fraction <= 1.0:
            raise ValueError("self_consistency_fraction must lie in [0, 1]")
        levels = math.log2(1.0 / self.min_step)
        if levels < 1 or levels != round(levels):
            raise ValueError(f"1 / min_step must be a power of 2 >= 2, got {1 / self.min_step}")

    @property
    def num_levels(self) -> int:
        """Number of gaps ``2d`` trained by self-consistency: ``log2(1 / min_step)``."""
        return round(math.log2(1.0 / self.min_step))

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TimePairs:
        num_off = int(self.self_consistency_fraction * n)
        num_diagonal = n - num_off
        span = self.t_max - self.t_min
        diagonal = self.t_min + span * torch.rand(
            num_diagonal, generator=generator, device=device, dtype=dtype
        )
        k = torch.randint(0, self.num_levels, (num_off,), generator=generator, device=device)
        sections = torch.pow(2.0, k.to(diagonal.dtype))
        u = torch.rand(num_off, generator=generator, device=device, dtype=dtype)
        s = self.t_min + span * torch.floor(u * sections) / sections
        t = s + span / sections
        return TimePairs(
            s=torch.cat([diagonal, s]), t=torch.cat([diagonal, t]), num_diagonal=num_diagonal
        )


class ShortcutObjective(_FlowMapObjective):
    """Shortcut models (Frans, Hafner, Levine, Abbeel 2024, eq. 5) as a flow-map objective.

    Diagonal samples carry flow matching ``|v_{t,t}(I_t) - dI_t/dt|^2`` (the paper's ``d = 0``
    term); the others :func:`shortcut_loss` on :class:`ShortcutTimePairs`, whose finest level
    ``2d = 2 min_step`` bootstraps from two Euler steps of the diagonal (in the official code the
    finest shortcut level is the flow-matching one); all optionally weighted by
    ``exp(-w_{s,t}) L + w_{s,t}``. The current parameters are the teacher (the paper's EMA
    teacher and its target clipping to ``[-4, 4]`` are left out). No state beyond the weight.
    """

    def __init__(
        self,
        path: AffinePath,
        min_step: float = 1.0 / 128.0,
        self_consistency_fraction: float = 0.25,
        learned_weight: bool = False,
    ) -> None:
        time_pairs = ShortcutTimePairs(
            self_consistency_fraction, min_step, path.schedule.t_min, path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight)
        self.finest_gap = 2.0 * min_step * (path.schedule.t_max - path.schedule.t_min)

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)

        def diagonal(rows: slice) -> Tensor:
            return diagonal_flow_matching_loss(
                model, point.x_t[rows], pairs.t[rows], point.velocity[rows], _rows(kw, rows)
            )

        def self_consistency(rows: slice) -> Tensor:
            s, d = pairs.s[rows], 0.5 * (pairs.t[rows] - pairs.s[rows])
            # Gaps are 2^-k spans: below 1.5 x the finest one means the finest level.
            teacher_gap = torch.where(2.0 * d < 1.5 * self.finest_gap, torch.zeros_like(d), d)
            return shortcut_loss(model, point.x_t[rows], s, d, teacher_gap, _rows(kw, rows))

        return self._weigh(_diagonal_then_off(pairs, diagonal, self_consistency), pairs)


class SplitMeanFlowObjective(_FlowMapObjective):
    """SplitMeanFlow (Guo et al. 2025, interval splitting consistency, Sec. 3 and Alg. 1).

    The paper's identity ``(t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t)``
    for ``r <= s <= t`` with ``s = (1 - lambda) t + lambda r``, ``lambda ~ U[0, 1]``, and ``z_s =
    z_t - (t - s) u(z_t, s, t)`` is, in flowmatch time (``u(z, r, t) = -v_{1-t,1-r}(z)``), the
    split ``v_{s,t}(x_s) = (1 - gamma) v_{s,u}(x_s) + gamma v_{u,t}(X_{s,u}(x_s))`` at ``u = gamma
    s + (1 - gamma) t``, ``gamma = 1 - lambda``: the noisier sub-interval is taken first, as in
    the paper. That is :func:`~flowmatch.losses.flow_maps.progressive_self_distillation_loss`
    with ``gamma ~ U[0, 1]`` (target under ``sg``, no JVP). Diagonal pairs carry the boundary
    condition ``u(z_t, t, t) = v``: flow matching of ``v_{t,t}``. Pairs default to
    :class:`~flowmatch.paths.time_pairs.DiagonalSplitTimePairs` (uniform, 3/4 diagonal).
    """

    def __init__(
        self,
        path: AffinePath,
        time_pairs: TimePairSampler | None = None,
        learned_weight: bool = False,
    ) -> None:
        time_pairs = time_pairs or DiagonalSplitTimePairs(
            0.75, t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight)

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        x1 = batch["x1"]
        num_off = x1.shape[0] - pairs.num_diagonal
        gamma = torch.rand(num_off, generator=generator, device=x1.device, dtype=x1.dtype)

        def diagonal(rows: slice) -> Tensor:
            return diagonal_flow_matching_loss(
                model, point.x_t[rows], pairs.t[rows], point.velocity[rows], _rows(kw, rows)
            )

        def split(rows: slice) -> Tensor:
            x_s, s, t = point.x_t[rows], pairs.s[rows], pairs.t[rows]
            return progressive_self_distillation_loss(model, x_s, s, t, gamma, _rows(kw, rows))

        return self._weigh(_diagonal_then_off(pairs, diagonal, split), pairs)


class ImprovedMeanFlowObjective(_FlowMapObjective):
    """Improved MeanFlow, iMF (Geng, Lu et al. 2025) without guidance, in flowmatch time.

    Off-diagonal pairs use :func:`improved_meanflow_loss`; diagonal pairs regress ``v_{t,t}`` on
    ``dI_t/dt`` with the same adaptive weight (iMF's ``r = t`` samples; their u- and v-losses
    coincide there and are counted once). Pairs default to
    :class:`~flowmatch.paths.time_pairs.LogitNormalTimePairs` with iMF's ``lognorm(-0.4, 1)``
    (``mean = 0.4`` here) and half the batch on the diagonal. Guidance as a network input (iMF's
    CFG scale and interval conditioning) needs a backbone input this library's networks lack and
    is left out. No state.
    """

    def __init__(
        self,
        path: AffinePath,
        time_pairs: TimePairSampler | None = None,
        power: float = 1.0,
        eps: float = 1e-2,
    ) -> None:
        time_pairs = time_pairs or LogitNormalTimePairs(
            diagonal_fraction=0.5, t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight=False)
        self.power = power
        self.eps = eps

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)

        def diagonal(rows: slice) -> Tensor:
            squared_error = diagonal_flow_matching_loss(
                model, point.x_t[rows], pairs.t[rows], point.velocity[rows], _rows(kw, rows)
            )
            return adaptive_weight(squared_error, self.power, self.eps) * squared_error

        def mean_flow(rows: slice) -> Tensor:
            return improved_meanflow_loss(
                model,
                point.x_t[rows],
                pairs.s[rows],
                pairs.t[rows],
                point.velocity[rows],
                self.power,
                self.eps,
                _rows(kw, rows),
            )

        return _diagonal_then_off(pairs, diagonal, mean_flow)


class AlphaFlowObjective(_FlowMapObjective):
    """alpha-Flow (Zhang et al. 2025): a curriculum from trajectory flow matching to MeanFlow.

    ``alpha(step)`` follows the official sigmoid schedule ``alpha = 1 - sigmoid(gamma (step -
    m) / (end_step - start_step))``, ``m`` the midpoint, with ``alpha = 1`` before
    ``start_step``, ``0`` after ``end_step``, and values within ``clamp`` of 0 or 1 snapped to
    them (defaults: ``gamma = 25``, ``clamp = 0.005``); it depends on ``step`` alone, so there is
    no state. Off-diagonal pairs use :func:`alpha_flow_loss` at ``alpha(step)``; diagonal pairs
    regress ``v_{t,t}`` on ``dI_t/dt`` with weight ``1 / (|r|^2 + eps)``. Pairs default to
    :class:`~flowmatch.paths.time_pairs.LogitNormalTimePairs` with half the batch on the
    diagonal (the official ``ratio_fm = 0.5``). Guidance is left out.
    """

    def __init__(
        self,
        path: AffinePath,
        end_step: int,
        start_step: int = 0,
        gamma: float = 25.0,
        clamp: float = 0.005,
        time_pairs: TimePairSampler | None = None,
        eps: float = 1e-3,
    ) -> None:
        if end_step <= start_step:
            raise ValueError(f"end_step must exceed start_step, got {start_step} and {end_step}")
        time_pairs = time_pairs or LogitNormalTimePairs(
            diagonal_fraction=0.5, t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight=False)
        self.start_step, self.end_step = start_step, end_step
        self.gamma, self.clamp, self.eps = gamma, clamp, eps

    def alpha(self, step: int) -> float:
        """The curriculum's ``alpha`` at ``step``: 1 (trajectory flow matching) down to 0."""
        if step < self.start_step:
            return 1.0
        if step > self.end_step:
            return 0.0
        middle = 0.5 * (self.start_step + self.end_step)
        progress = (step - middle) / (self.end_step - self.start_step)
        alpha = 1.0 - 1.0 / (1.0 + math.exp(-self.gamma * progress))
        if alpha < self.clamp:
            return 0.0
        return 1.0 if alpha > 1.0 - self.clamp else alpha

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        alpha = self.alpha(step)

        def diagonal(rows: slice) -> Tensor:
            squared_error = diagonal_flow_matching_loss(
                model, point.x_t[rows], pairs.t[rows], point.velocity[rows], _rows(kw, rows)
            )
            return adaptive_weight(squared_error, 1.0, self.eps) * squared_error

        def trajectory(rows: slice) -> Tensor:
            x_s, s, t, velocity = (
                point.x_t[rows],
                pairs.s[rows],
                pairs.t[rows],
                point.velocity[rows],
            )
            return alpha_flow_loss(model, x_s, s, t, velocity, alpha, self.eps, _rows(kw, rows))

        return _diagonal_then_off(pairs, diagonal, trajectory)
