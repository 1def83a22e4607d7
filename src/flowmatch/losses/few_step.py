"""Few-step flow-map families of 2024-2025: shortcut models, iMF, alpha-Flow, TVM and
continuous-time consistency (sCM). SplitMeanFlow's loss is progressive self-distillation
(:func:`~flowmatch.losses.flow_map_objectives.psd_uniform`).

This module owns their loss kernels and training objectives, written for a two-time flow map
``X_{s,t}(x) = x + (t - s) v_{s,t}(x)`` in flowmatch time (``t = 0`` noise, ``t = 1`` data; see
:mod:`flowmatch.nets.flow_map`). Papers that put noise at ``t = 1`` (MeanFlow and its successors)
write an average velocity ``u(z, r, t)``, ``r < t``, for the jump from the noisier time ``t`` to
``r``; in flowmatch time that is ``u(z, r, t) = -v_{1-t, 1-r}(z)``: their start ``t`` is our
``s = 1 - t``, their end ``r`` our ``t = 1 - r``, and their gap ``t - r`` is our ``t - s``.

Kernels take interpolant points ``x_s: [B, ...]`` and times ``[B]`` drawn by the caller, draw no
randomness and return the squared residual ``[B]`` averaged over the non-batch dimensions;
targets marked ``sg`` carry no gradient. The network calls that make up one residual share
dropout masks (:class:`~flowmatch.losses.flow_maps.SharedRandomness`): its value, derivative
and target are those of one sub-network. Objectives follow the training loop's interface
``objective(model, batch, step, generator) -> loss [B]``: they draw the path's noise, the time
pairs and any extra randomness from ``generator`` in that order, pass ``batch["y"]`` to the
model as ``y`` when present, and hold all their state in ``state_dict`` (the optional learned
loss weight; nothing else: a distillation's teacher velocity is frozen and kept out of it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowmatch.losses.flow_map_objectives import (
    EMATarget,
    _diagonal_then_off,
    _FlowMapObjective,
    _frozen,
    _rows,
)
from flowmatch.losses.flow_maps import (
    SharedRandomness,
    TimeDerivative,
    _mean_square,
    adaptively_weighted,
    diagonal_flow_matching_loss,
    directional_derivative,
    lagrangian_map_distillation_loss,
    lagrangian_self_distillation_loss,
    meanflow_loss,
)
from flowmatch.paths.affine import AffinePath
from flowmatch.paths.schedules import Schedule
from flowmatch.paths.time_pairs import LogitNormalTimePairs, TimePairs
from flowmatch.paths.time_samplers import LogitNormalTimeSampler
from flowmatch.shapes import broadcast_time
from flowmatch.solvers.sde import time_of_noise_ratio
from flowmatch.types import FlowMap, VelocityField

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
    with SharedRandomness(x_s.device) as shared:
        with torch.no_grad():
            first = shared(flow_map.slope, x_s, s, s + teacher_gap, **kw)
            x_mid = x_s + broadcast_time(d, x_s) * first
            second = shared(flow_map.slope, x_mid, s + d, s + d + teacher_gap, **kw)
            target = 0.5 * (first + second)
        student = shared(flow_map.slope, x_s, s, s + 2.0 * d, **kw)
    return _mean_square(student - target)


def improved_meanflow_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    velocity: Tensor,
    power: float = 1.0,
    eps: float = 1e-2,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
    tangent_graph: bool = True,
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
    dI_s/ds: [B, ...]``; squares are averaged over dimensions (the paper sums). ``method``
    computes the time derivative (one JVP, or central differences); it is under ``sg``, so with
    ``tangent_graph=False`` it is computed without an autograd graph.
    """
    kw = model_kwargs or {}
    with SharedRandomness(x_s.device) as shared:
        diagonal = shared(flow_map.velocity, x_s, s, **kw)
        mean_flow = shared(
            directional_derivative,
            flow_map.slope,
            x_s,
            s,
            t,
            dx=diagonal.detach(),
            ds=torch.ones_like(s),
            model_kwargs=kw,
            method=method,
            tangent_graph=tangent_graph,
        )
    compound = mean_flow.value - broadcast_time(t - s, x_s) * mean_flow.derivative.detach()
    u_error = _mean_square(compound - velocity)
    v_error = _mean_square(diagonal - velocity)
    return adaptively_weighted(u_error, power, eps) + adaptively_weighted(v_error, power, eps)


def alpha_flow_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    velocity: Tensor,
    alpha: float,
    eps: float = 1e-3,
    model_kwargs: dict[str, Any] | None = None,
    power: float = 1.0,
) -> Tensor:
    """alpha-Flow (Zhang et al. 2025, arXiv 2510.20771; the official ``AlphaFlowLoss``).

    In MeanFlow time the target is ``u_tgt = alpha v + (1 - alpha) u(z_t - alpha (t - r) v, r,
    t - alpha (t - r))`` with the conditional velocity ``v``: ``alpha = 1`` is trajectory flow
    matching, ``alpha -> 0`` MeanFlow. In flowmatch time, with ``u = s + alpha (t - s)`` and
    ``velocity = dI_s/ds``:

    ``r = v_{s,t}(x_s) - sg(alpha velocity + (1 - alpha) v_{u,t}(x_s + alpha (t - s) velocity))``,

    loss ``alpha adaptive_weight(|r|^2, power, eps) |r|^2`` (at ``power = 1`` the code's weight
    ``alpha / (|r|^2 + eps)``, which keeps the gradient's scale as ``r = O(alpha)``). At
    ``alpha = 0`` it is :func:`~flowmatch.losses.flow_maps.meanflow_loss` (one JVP).
    With the exact ``b_s`` for ``velocity`` the residual at the exact map is ``O(alpha^2 (t -
    s))`` (an Euler step stands in for the flow over ``alpha (t - s)``): consistent as ``alpha
    -> 0`` only. ``alpha`` is one float for the batch.
    """
    if alpha == 0.0:
        return meanflow_loss(flow_map, x_s, s, t, velocity, power, eps, model_kwargs)
    kw = model_kwargs or {}
    with SharedRandomness(x_s.device) as shared:
        with torch.no_grad():
            target = alpha * velocity
            if alpha < 1.0:
                gap = t - s
                x_u = x_s + broadcast_time(alpha * gap, x_s) * velocity
                mean = shared(flow_map.slope, x_u, s + alpha * gap, t, **kw)
                target = target + (1.0 - alpha) * mean
        student = shared(flow_map.slope, x_s, s, t, **kw)
    squared_error = _mean_square(student - target)
    return alpha * adaptively_weighted(squared_error, power, eps)


def terminal_velocity_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    x_u: Tensor,
    u: Tensor,
    velocity: Tensor,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
    target: VelocityField | None = None,
) -> Tensor:
    """Terminal Velocity Matching (Zhou, Parger, Haque, Song 2025, Sec. 3; official ``TVMWrapper``).

    TVM writes the jump from the noisier time ``t`` to ``s`` as ``f(x_t, t, s) = (s - t) F(x_t, t,
    s)`` and matches its terminal velocity ``d/ds f`` to the model's velocity ``F(., s, s)`` at the
    transported point, plus flow matching of ``F(x_s', s', s')`` at an independent time. In
    flowmatch time (``F = -v``, their end time ``s`` is our ``t``) the two terms are

    ``r_1 = d_t X_{s,t}(x_s) - sg(v_{t,t}(sg X_{s,t}(x_s)))``, ``r_2 = v_{u,u}(x_u) - velocity``,

    the first being :func:`~flowmatch.losses.flow_maps.lagrangian_self_distillation_loss`: the
    gradient flows through ``d_t X`` (a JVP in ``t`` alone, differentiated again by backward, as
    the official code with ``detach_jvp=False``), not through the target. ``x_u, u, velocity =
    I_u, u, dI_u/du``; returns ``|r_1|^2 + |r_2|^2``, each averaged over dimensions. At ``s = t``
    the first term vanishes with its gradient (the official code masks it, its target being an
    EMA network). ``target``: the velocity of ``r_1``'s target, e.g. an EMA copy's (default: the
    map's own ``v_{t,t}``). One JVP. ``r_2``, a separate regression at another time, draws its
    own dropout masks.
    """
    if target is None:
        terminal = lagrangian_self_distillation_loss(flow_map, x_s, s, t, model_kwargs, method)
    else:
        terminal = lagrangian_map_distillation_loss(
            flow_map, target, x_s, s, t, model_kwargs, method
        )
    return terminal + diagonal_flow_matching_loss(flow_map, x_u, u, velocity, model_kwargs)


def continuous_consistency_loss(
    flow_map: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    velocity: Tensor,
    warmup: float = 1.0,
    tangent_scale: float | None = 0.1,
    model_kwargs: dict[str, Any] | None = None,
    method: TimeDerivative = "jvp",
) -> Tensor:
    """Continuous-time consistency, sCM (Lu & Song 2024, arXiv 2410.11081), on a flow map.

    A consistency model is the flow map to the data end, ``f(x_s, s) = X_{s,1}(x_s)`` (Boffi,
    Albergo, Vanden-Eijnden 2024); its condition ``d/ds X_{s,t}(x_s) = 0`` along the flow
    of ``velocity = b`` is the Eulerian residual, with ``X = x + (t - s) v`` and ``d/ds = d_s + b .
    grad_x``:

    ``D = d/ds X_{s,t}(x_s) = b - v_{s,t}(x_s) + (t - s) d/ds v_{s,t}(x_s)``.

    sCM's loss ``|F - sg(F + g)|^2`` on the network's output, with the tangent ``g`` along ``D``
    (toward the less noisy end), is here ``|v_{s,t} - sg(v_{s,t} + g)|^2`` with ``g = sg(b - v +
    warmup (t - s) d/ds v)``: sCM's warm-up ``r`` scales the term with the network's time
    derivative, and ``warmup = 1`` gives ``g = D``. Its tangent normalisation ``g / (|g| + c)``,
    ``c = tangent_scale`` (sCM's 0.1; None: none), takes ``|g|`` as the root mean square over
    dimensions, as the loss averages over them. The value is ``|g|^2`` and the gradient ``-2 g .
    grad v``: without normalisation at ``t = 1`` this is MeanFlow (Geng et al. 2025, eq. 10).
    ``velocity``: a teacher's ``b_s(x_s)`` (sCD) or ``dI_s/ds`` (sCT; the normalisation makes the
    conditional target biased, as in sCM). The JVP has no graph.
    """
    kw = model_kwargs or {}
    mean_flow = directional_derivative(
        flow_map.slope,
        x_s,
        s,
        t,
        dx=velocity,
        ds=torch.ones_like(s),
        model_kwargs=kw,
        method=method,
        tangent_graph=False,
    )
    slope = mean_flow.value
    with torch.no_grad():
        gap = broadcast_time(t - s, x_s)
        tangent = velocity - slope + warmup * gap * mean_flow.derivative
        if tangent_scale is not None:
            rms = _mean_square(tangent).sqrt()
            tangent = tangent / broadcast_time(rms + tangent_scale, x_s)
        target = slope + tangent
    return _mean_square(slope - target)


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
            return self._diagonal(model, point, pairs, kw, rows)

        def self_consistency(rows: slice) -> Tensor:
            s, d = pairs.s[rows], 0.5 * (pairs.t[rows] - pairs.s[rows])
            # Gaps are 2^-k spans: below 1.5 x the finest one means the finest level.
            teacher_gap = torch.where(2.0 * d < 1.5 * self.finest_gap, torch.zeros_like(d), d)
            return shortcut_loss(model, point.x_t[rows], s, d, teacher_gap, _rows(kw, rows))

        return self._weigh(_diagonal_then_off(pairs, diagonal, self_consistency), pairs)


class ImprovedMeanFlowObjective(_FlowMapObjective):
    """Improved MeanFlow, iMF (Geng, Lu et al. 2025) without guidance, in flowmatch time.

    Off-diagonal pairs use :func:`improved_meanflow_loss`; diagonal pairs regress ``v_{t,t}`` on
    ``dI_t/dt`` with the same adaptive weight (iMF's ``r = t`` samples; their u- and v-losses
    coincide there and are counted once). Pairs default to
    :class:`~flowmatch.paths.time_pairs.LogitNormalTimePairs` with iMF's ``lognorm(-0.4, 1)``
    (``mean = 0.4`` here) and half the batch on the diagonal; ``time_derivative`` and
    ``tangent_graph`` as in :func:`improved_meanflow_loss`. Guidance as a network input (iMF's
    CFG scale and interval conditioning) needs a backbone input this library's networks lack and
    is left out. No state.
    """

    def __init__(
        self,
        path: AffinePath,
        time_pairs: TimePairSampler | None = None,
        power: float = 1.0,
        eps: float = 1e-2,
        time_derivative: TimeDerivative = "jvp",
        tangent_graph: bool = True,
    ) -> None:
        time_pairs = time_pairs or LogitNormalTimePairs(
            diagonal_fraction=0.5, t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight=False)
        self.power = power
        self.eps = eps
        self.time_derivative = time_derivative
        self.tangent_graph = tangent_graph

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)

        def diagonal(rows: slice) -> Tensor:
            squared_error = self._diagonal(model, point, pairs, kw, rows)
            return adaptively_weighted(squared_error, self.power, self.eps)

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
                method=self.time_derivative,
                tangent_graph=self.tangent_graph,
            )

        return _diagonal_then_off(pairs, diagonal, mean_flow)


class AlphaFlowObjective(_FlowMapObjective):
    """alpha-Flow (Zhang et al. 2025): a curriculum from trajectory flow matching to MeanFlow.

    ``alpha(step)`` follows the official sigmoid schedule ``alpha = 1 - sigmoid(gamma (step -
    m) / (end_step - start_step))``, ``m`` the midpoint, with ``alpha = 1`` before
    ``start_step``, ``0`` after ``end_step``, and values within ``clamp`` of 0 or 1 snapped to
    them (defaults: ``gamma = 25``, ``clamp = 0.005``); it depends on ``step`` alone, so there is
    no state. Off-diagonal pairs use :func:`alpha_flow_loss` at ``alpha(step)``; diagonal pairs
    regress ``v_{t,t}`` on ``dI_t/dt`` with weight ``1 / (|r|^2 + eps)^power``. Pairs default to
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
        power: float = 1.0,
        eps: float = 1e-3,
    ) -> None:
        if end_step <= start_step:
            raise ValueError(f"end_step must exceed start_step, got {start_step} and {end_step}")
        time_pairs = time_pairs or LogitNormalTimePairs(
            diagonal_fraction=0.5, t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight=False)
        self.start_step, self.end_step = start_step, end_step
        self.gamma, self.clamp, self.power, self.eps = gamma, clamp, power, eps

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
            squared_error = self._diagonal(model, point, pairs, kw, rows)
            return adaptively_weighted(squared_error, self.power, self.eps)

        def trajectory(rows: slice) -> Tensor:
            x_s, s, t, velocity = (
                point.x_t[rows],
                pairs.s[rows],
                pairs.t[rows],
                point.velocity[rows],
            )
            return alpha_flow_loss(
                model, x_s, s, t, velocity, alpha, self.eps, _rows(kw, rows), self.power
            )

        return _diagonal_then_off(pairs, diagonal, trajectory)


@dataclass(frozen=True)
class TerminalVelocityTimePairs:
    """TVM's pairs (official ``TVMLoss.sample_ts``, ``s_P = (-0.4, 1)``, ``gap_P = (-0.8, 1)``).

    In flowmatch time: the gap ``t - s = sigmoid(gap_mean + gap_std z)``, the end time ``t =
    sigmoid(mean + std z')`` conditioned on ``t >= t - s`` (drawn by inverting the normal CDF), and
    ``s = t - gap``; the official end time, noise at 1, is ``lognorm(-0.4, 1)``, which is ``mean =
    0.4`` here. Then both are clipped to ``[t_min, t_max]``. No pair is on the diagonal.
    """

    mean: float = 0.4
    std: float = 1.0
    gap_mean: float = -0.8
    gap_std: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TimePairs:
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        gap = torch.sigmoid(self.gap_mean + self.gap_std * z)
        lowest = torch.special.ndtr((torch.logit(gap) - self.mean) / self.std)
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        logit_t = self.mean + self.std * torch.special.ndtri(lowest + u * (1.0 - lowest))
        t = torch.sigmoid(logit_t)
        s = (t - gap).clamp(self.t_min, self.t_max)
        return TimePairs(s=s, t=t.clamp(self.t_min, self.t_max), num_diagonal=0)


class TerminalVelocityObjective(_FlowMapObjective):
    """Terminal Velocity Matching, TVM (Zhou, Parger, Haque, Song 2025), unguided, flowmatch time.

    Every sample carries both terms of :func:`terminal_velocity_loss`: the terminal velocity at a
    pair of ``time_pairs`` (default :class:`TerminalVelocityTimePairs`) and flow matching at ``u =
    sigmoid(mean + std z)`` on the same noise and data (the official ``s'``, drawn after the
    pairs). The terminal target, under stop-gradient, is the velocity of an EMA copy of the
    network with ``target_decay`` (the official code's 0.99; :class:`~flowmatch.losses.
    flow_map_objectives.EMATarget`), or with ``target_decay=None`` that of the current
    parameters. The official guidance input and ``1 / w^2`` weights need a backbone input this
    library's networks lack: both are left out. ``time_derivative`` computes ``d_t X``. State:
    the EMA copy's weights and step, under ``target.``.
    """

    def __init__(
        self,
        path: AffinePath,
        time_pairs: TimePairSampler | None = None,
        mean: float = 0.4,
        std: float = 1.0,
        time_derivative: TimeDerivative = "jvp",
        target_decay: float | None = None,
    ) -> None:
        t_min, t_max = path.schedule.t_min, path.schedule.t_max
        time_pairs = time_pairs or TerminalVelocityTimePairs(mean, std, t_min=t_min, t_max=t_max)
        super().__init__(path, time_pairs, learned_weight=False)
        self.velocity_times = LogitNormalTimeSampler(mean, std, t_min, t_max)
        self.time_derivative = time_derivative
        self.target = EMATarget(target_decay) if target_decay is not None else None

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        x1 = batch["x1"]
        u = self.velocity_times(x1.shape[0], generator, x1.device, x1.dtype)
        anchor = self.path.sample(point.x0, point.x1, u)
        target = None
        if self.target is not None:
            if not isinstance(model, nn.Module):
                raise TypeError("an EMA target needs an nn.Module flow map")
            target = self.target(model, step).velocity
        return terminal_velocity_loss(
            model,
            point.x_t,
            pairs.s,
            pairs.t,
            anchor.x_t,
            u,
            anchor.velocity,
            kw,
            self.time_derivative,
            target,
        )

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        return state if self.target is None else state | self.target.state("target.")

    def load_state_dict(  # type: ignore[override]
        self, state: dict[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        if self.target is not None:
            state = self.target.load(state, "target.")
        return super().load_state_dict(state, strict, assign)


@dataclass(frozen=True)
class ConsistencyTimePairs:
    """sCM's times (Lu & Song 2024) as flow-map pairs ``(s, t_max)``, plus the diagonal.

    sCM draws EDM's noise level ``log sigma ~ N(P_mean, P_std)`` (defaults ``-1.0, 1.4``); for an
    affine path that level is the noise-to-signal ratio ``sigma(s) / alpha(s)`` (``x_s / alpha_s``
    is the data plus ``sigma_s / alpha_s`` noise), so ``s`` solves ``sigma(s) / alpha(s) =
    exp(mean + std z)`` on ``[t_min, t_max]`` (bisection). The first ``floor(diagonal_fraction
    n)`` pairs are diagonal ``s = t`` at times of the same law; the others end at ``t_max``.
    """

    schedule: Schedule
    mean: float = -1.0
    std: float = 1.4
    diagonal_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.diagonal_fraction <= 1.0:
            raise ValueError(f"diagonal_fraction must lie in [0, 1], got {self.diagonal_fraction}")

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TimePairs:
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        lo = torch.full_like(z, self.schedule.t_min)
        hi = torch.full_like(z, self.schedule.t_max)
        s = time_of_noise_ratio(self.schedule, torch.exp(self.mean + self.std * z), lo, hi)
        num_diagonal = int(self.diagonal_fraction * n)
        t = torch.cat([s[:num_diagonal], hi[num_diagonal:]])
        return TimePairs(s=s, t=t, num_diagonal=num_diagonal)


class ContinuousConsistencyObjective(_FlowMapObjective):
    """sCM (Lu & Song 2024) for the flow map to the data end ``X_{s,1}``: sCT, or sCD (a teacher).

    Off-diagonal pairs ``(s, t_max)`` of :class:`ConsistencyTimePairs` use
    :func:`continuous_consistency_loss` with the tangent along ``b = dI_s/ds`` (training, sCT) or
    ``b = teacher(x_s, s)`` (distillation, sCD; frozen, out of ``state_dict``), warm-up ``r =
    min(1, step / warmup_steps)`` (sCM's linear warm-up over 10k steps; it depends on ``step``
    alone) and tangent normalisation ``tangent_scale``. Diagonal pairs regress ``v_{t,t}`` on
    ``dI_t/dt``, which sCM lacks and a flow map's velocity needs. ``learned_weight`` is sCM's
    adaptive weighting ``exp(-w) L + w`` (the two-time weight at ``(s, 1)``). The current
    parameters are the tangent's network (sCM's ``theta^-``, no EMA). A map trained only to the
    data end takes several jumps by re-noising (``gamma = 1`` jumps), not by chaining. State:
    the learned weight only.
    """

    def __init__(
        self,
        path: AffinePath,
        teacher: VelocityField | None = None,
        warmup_steps: int = 10_000,
        tangent_scale: float | None = 0.1,
        diagonal_fraction: float = 0.25,
        time_pairs: TimePairSampler | None = None,
        learned_weight: bool = False,
        time_derivative: TimeDerivative = "jvp",
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        time_pairs = time_pairs or ConsistencyTimePairs(
            path.schedule, diagonal_fraction=diagonal_fraction
        )
        super().__init__(path, time_pairs, learned_weight)
        self._teacher = _frozen(teacher) if teacher is not None else None
        self.warmup_steps = warmup_steps
        self.tangent_scale = tangent_scale
        self.time_derivative = time_derivative

    @property
    def teacher(self) -> VelocityField | None:
        return self._teacher.call if self._teacher is not None else None

    def warmup(self, step: int) -> float:
        """sCM's tangent warm-up ``r``: ``step / warmup_steps`` up to 1."""
        return min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        warmup = self.warmup(step)

        def diagonal(rows: slice) -> Tensor:
            return self._diagonal(model, point, pairs, kw, rows)

        def consistency(rows: slice) -> Tensor:
            x_s, s, t, row_kw = point.x_t[rows], pairs.s[rows], pairs.t[rows], _rows(kw, rows)
            teacher = self.teacher
            if teacher is None:
                velocity = point.velocity[rows]
            else:
                with torch.no_grad():
                    velocity = teacher(x_s, s, **row_kw)
            return continuous_consistency_loss(
                model,
                x_s,
                s,
                t,
                velocity,
                warmup,
                self.tangent_scale,
                row_kw,
                self.time_derivative,
            )

        return self._weigh(_diagonal_then_off(pairs, diagonal, consistency), pairs)
