"""Training objectives for flow maps: self-distillation, MeanFlow and distillation from a teacher.

This module owns the wrappers that turn the losses of :mod:`flowmatch.losses.flow_maps` into the
training loop's objective interface ``objective(model, batch, step, generator) -> loss [B]``:
they draw the path's noise ``x0 ~ N(0, I)``, the ``(s, t)`` pairs (by default on the schedule's
``[t_min, t_max]``) and any extra randomness from ``generator``, in that order, pass
``batch["y"]`` and ``batch["context"]`` to the model under the same names when present, and
return per-sample losses.
Objectives are ``nn.Module``s; their ``state_dict`` holds everything a resumed run needs (the
learned loss weight, the PFMM phase and teacher-map copy), never a teacher velocity. Which loss
an objective applies is a function passed in (:func:`lsd`, ``lagrangian_map_distillation_loss``,
...), not a name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from flowmatch.losses.flow_maps import (
    LearnedLossWeight,
    TimeDerivative,
    adaptively_weighted,
    diagonal_flow_matching_loss,
    eulerian_self_distillation_loss,
    fused_lsd_losses,
    lagrangian_map_distillation_loss,
    lagrangian_self_distillation_loss,
    meanflow_loss,
    progressive_map_distillation_loss,
    progressive_self_distillation_loss,
)
from flowmatch.losses.flow_matching import conditioning, paired_noise
from flowmatch.paths.affine import AffinePath, PathSample
from flowmatch.paths.time_pairs import DiagonalSplitTimePairs, LogitNormalTimePairs, TimePairs
from flowmatch.solvers.steps import euler_step
from flowmatch.types import Coupling, FlowMap, TwoTimeField, VelocityField

TimePairSampler = Callable[..., TimePairs]


def _rows(kw: dict[str, Tensor], rows: slice) -> dict[str, Tensor]:
    """The model keyword arguments of the samples ``rows``."""
    return {k: v[rows] for k, v in kw.items()}


def _diagonal_then_off(
    pairs: TimePairs, diagonal: Callable[[slice], Tensor], off_diagonal: Callable[[slice], Tensor]
) -> Tensor:
    """``diagonal(rows)`` of the first ``num_diagonal`` samples, then ``off_diagonal(rows)`` of
    the rest: ``[B]``. An empty part is skipped (``torch.func.jvp`` has a fixed cost even on an
    empty batch)."""
    n, parts = pairs.num_diagonal, []
    if n > 0:
        parts.append(diagonal(slice(0, n)))
    if n < pairs.s.shape[0]:
        parts.append(off_diagonal(slice(n, None)))
    return torch.cat(parts)


class _FlowMapObjective(nn.Module):
    """Draws ``x0 ~ N(0, I)`` (the path's noise, as in ``cfm_loss``), pairs it with ``x1`` by
    ``coupling`` when one is set (condition-aware with the batch's labels or contexts unless
    ``condition_aware`` is false), draws ``(s, t) ~ time_pairs`` and ``x_s = alpha_s x1 +
    sigma_s x0``; applies the optional learned weight ``w_{s,t}``."""

    def __init__(self, path: AffinePath, time_pairs: TimePairSampler, learned_weight: bool):
        super().__init__()
        self.path = path
        self.time_pairs = time_pairs
        self.loss_weight = LearnedLossWeight() if learned_weight else None
        self.coupling: Coupling | None = None
        self.condition_aware = True

    def prepare(
        self, batch: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``batch`` with its paired noise ``x0`` (:func:`~flowmatch.losses.flow_matching.
        paired_noise`), used as it is by ``forward``."""
        return {**batch, "x0": paired_noise(batch, self.coupling, self.condition_aware, generator)}

    def _draw(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> tuple[PathSample, TimePairs, dict[str, Tensor]]:
        if "x0" not in batch:
            batch = self.prepare(batch, generator)
        x1 = batch["x1"]
        pairs = self.time_pairs(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        return self.path.sample(batch["x0"], x1, pairs.s), pairs, conditioning(batch)

    @staticmethod
    def _diagonal(
        model: FlowMap, point: PathSample, pairs: TimePairs, kw: dict[str, Tensor], rows: slice
    ) -> Tensor:
        """``|v_{t,t}(x_t) - dI_t/dt|^2`` of the samples ``rows``: flow matching on the diagonal."""
        x_t, t, velocity = point.x_t[rows], pairs.t[rows], point.velocity[rows]
        return diagonal_flow_matching_loss(model, x_t, t, velocity, _rows(kw, rows))

    def _weigh(self, loss: Tensor, pairs: TimePairs) -> Tensor:
        return loss if self.loss_weight is None else self.loss_weight.weigh(loss, pairs.s, pairs.t)


OffDiagonalLoss = Callable[
    [FlowMap, Tensor, Tensor, Tensor, dict[str, Tensor], torch.Generator | None], Tensor
]
"""``loss(flow_map, x_s, s, t, model_kwargs, generator) -> [B]``: a self-distillation term."""


def lsd(
    model: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    kw: dict,
    generator: Any,
    method: TimeDerivative = "jvp",
) -> Tensor:
    """Lagrangian self-distillation (Boffi, Albergo, Vanden-Eijnden 2025, Prop. 2.3);
    ``method`` computes ``d_t X``."""
    return lagrangian_self_distillation_loss(model, x_s, s, t, kw, method)


def esd(
    model: FlowMap,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    kw: dict,
    generator: Any,
    method: TimeDerivative = "jvp",
) -> Tensor:
    """Eulerian self-distillation (Boffi, Albergo, Vanden-Eijnden 2025, Prop. 2.3);
    ``method`` computes ``d_s X`` and the transport term."""
    return eulerian_self_distillation_loss(model, x_s, s, t, kw, method)


def psd_midpoint(
    model: FlowMap, x_s: Tensor, s: Tensor, t: Tensor, kw: dict, generator: Any
) -> Tensor:
    """Progressive self-distillation through the midpoint ``gamma = 1/2`` (Boffi, Albergo,
    Vanden-Eijnden 2025, Alg. 4)."""
    return progressive_self_distillation_loss(model, x_s, s, t, torch.full_like(s, 0.5), kw)


def psd_uniform(
    model: FlowMap, x_s: Tensor, s: Tensor, t: Tensor, kw: dict, generator: Any
) -> Tensor:
    """Progressive self-distillation through ``gamma ~ U(0, 1)`` drawn from ``generator``.

    This is also SplitMeanFlow (Guo et al. 2025, interval splitting consistency, Sec. 3 and
    Alg. 1): its identity ``(t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t)``
    at ``s = (1 - lambda) t + lambda r``, ``lambda ~ U[0, 1]``, ``z_s = z_t - (t - s) u(z_t, s,
    t)``, read in flowmatch time (``u(z, r, t) = -v_{1-t,1-r}(z)``), is the split ``v_{s,t}(x_s)
    = (1 - gamma) v_{s,u}(x_s) + gamma v_{u,t}(X_{s,u}(x_s))`` at ``gamma = 1 - lambda``, the
    noisier sub-interval first, its target under ``sg`` as here."""
    gamma = torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype)
    return progressive_self_distillation_loss(model, x_s, s, t, gamma, kw)


class SelfDistillationObjective(_FlowMapObjective):
    """Flow-map self-distillation ``L_b + L_D`` (Boffi, Albergo, Vanden-Eijnden 2025, Prop. 2.3).

    The first ``floor(diagonal_fraction B)`` samples carry the diagonal flow-matching loss
    ``|v_{t,t}(I_t) - dI_t/dt|^2``, the rest the off-diagonal term ``distill`` (:func:`lsd`,
    :func:`esd`, :func:`psd_midpoint`, :func:`psd_uniform` or any ``OffDiagonalLoss``), each
    optionally weighted by ``exp(-w_{s,t}) L + w_{s,t}``. ``both_orders`` also trains backward
    maps ``s > t``. The model's current parameters are its own teacher (no EMA teacher); its
    calls draw the student's dropout masks (:class:`~flowmatch.losses.flow_maps.SharedRandomness`).
    """

    def __init__(
        self,
        path: AffinePath,
        distill: OffDiagonalLoss = lsd,
        diagonal_fraction: float = 0.75,
        learned_weight: bool = False,
        both_orders: bool = False,
    ) -> None:
        time_pairs = DiagonalSplitTimePairs(
            diagonal_fraction, both_orders, path.schedule.t_min, path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight)
        self.distill = distill

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        return self._weigh(self._losses(model, point, pairs, kw, generator), pairs)

    def _losses(
        self,
        model: FlowMap,
        point: PathSample,
        pairs: TimePairs,
        kw: dict[str, Tensor],
        generator: torch.Generator | None,
    ) -> Tensor:
        """The diagonal and off-diagonal losses ``[B]``, before the learned weight."""

        def diagonal(rows: slice) -> Tensor:
            return self._diagonal(model, point, pairs, kw, rows)

        def off_diagonal(rows: slice) -> Tensor:
            x_s, s, t = point.x_t[rows], pairs.s[rows], pairs.t[rows]
            return self.distill(model, x_s, s, t, _rows(kw, rows), generator)

        return _diagonal_then_off(pairs, diagonal, off_diagonal)


class FusedLSDObjective(SelfDistillationObjective):
    """LSD by a central difference in two network calls a step (:func:`~flowmatch.losses.
    flow_maps.fused_lsd_losses`) instead of four: the diagonal samples and both shifted maps of
    the others in one call, the target in a second. The loss of ``SelfDistillationObjective(path,
    partial(lsd, method="finite_difference"))`` up to rounding, for a network that draws no random
    numbers (no dropout); ``difference_step`` is the difference's ``h``."""

    def __init__(
        self,
        path: AffinePath,
        diagonal_fraction: float = 0.75,
        learned_weight: bool = False,
        both_orders: bool = False,
        difference_step: float = 1e-3,
    ) -> None:
        distill = partial(lsd, method="finite_difference")
        super().__init__(path, distill, diagonal_fraction, learned_weight, both_orders)
        self.difference_step = difference_step

    def _losses(
        self,
        model: FlowMap,
        point: PathSample,
        pairs: TimePairs,
        kw: dict[str, Tensor],
        generator: torch.Generator | None,
    ) -> Tensor:
        diagonal_velocity = point.velocity[: pairs.num_diagonal]
        x_s, s, t, h = point.x_t, pairs.s, pairs.t, self.difference_step
        return fused_lsd_losses(model, x_s, s, t, diagonal_velocity, kw, h)


class MeanFlowObjective(_FlowMapObjective):
    """MeanFlow (Geng et al. 2025, eqs. 6, 9, 10) on a flow map, in flowmatch time.

    Pairs from ``time_pairs`` (default :class:`LogitNormalTimePairs`: MeanFlow's ImageNet
    setting); diagonal samples regress ``v_{t,t}`` on ``dI_t/dt`` without a JVP, the others use
    :func:`meanflow_loss` (``method=time_derivative``, ``tangent_graph``); all are weighted by
    ``sg(1 / (|D|^2 + eps)^power)``. No state.
    """

    def __init__(
        self,
        path: AffinePath,
        time_pairs: TimePairSampler | None = None,
        power: float = 1.0,
        eps: float = 1e-3,
        time_derivative: TimeDerivative = "jvp",
        tangent_graph: bool = True,
    ) -> None:
        time_pairs = time_pairs or LogitNormalTimePairs(
            t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight=False)
        self.power = power
        self.eps = eps
        self.time_derivative = time_derivative
        self.tangent_graph = tangent_graph  # False: the stop-gradient tangent without a graph

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
            x_s, s, t, velocity = (
                point.x_t[rows],
                pairs.s[rows],
                pairs.t[rows],
                point.velocity[rows],
            )
            return meanflow_loss(
                model,
                x_s,
                s,
                t,
                velocity,
                self.power,
                self.eps,
                _rows(kw, rows),
                self.time_derivative,
                self.tangent_graph,
            )

        return _diagonal_then_off(pairs, diagonal, mean_flow)


MapDistillationLoss = Callable[..., Tensor]
"""``loss(flow_map, teacher, x_s, s, t, model_kwargs) -> [B]``, e.g.
:func:`~flowmatch.losses.flow_maps.lagrangian_map_distillation_loss` (LMD) or
:func:`~flowmatch.losses.flow_maps.eulerian_map_distillation_loss` (EMD)."""


@dataclass(frozen=True)
class _Frozen:
    """A network the objective calls but does not own: out of its parameters, ``state_dict``
    and ``.to()`` (a plain attribute, not a submodule)."""

    call: Callable[..., Tensor]


def _weights(frozen: _Frozen) -> dict[str, Tensor]:
    """The weights of a frozen module (a PFMM teacher-map copy)."""
    assert isinstance(frozen.call, nn.Module)
    return frozen.call.state_dict()


def _frozen(network: Callable[..., Tensor]) -> _Frozen:
    """``network`` (a module, or a module's method such as ``.velocity``) frozen in eval mode."""
    owner = network if isinstance(network, nn.Module) else getattr(network, "__self__", None)
    if isinstance(owner, nn.Module):
        owner.requires_grad_(False).eval()
    return _Frozen(network)


_Network = TypeVar("_Network", bound=nn.Module)


class EMATarget:
    """A target network: a frozen copy of the model whose weights follow an exponential moving
    average ``w <- decay w + (1 - decay) theta``, updated once per training step (the first call
    of a step; micro-batches of one step share it). It starts as a copy of the model at its
    first call. Its weights and step are objective state (:meth:`state`, :meth:`load`)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.network: nn.Module | None = None
        self.step = -1  # the last step whose parameters the average holds
        self._restored: dict[str, Tensor] | None = None

    def __call__(self, model: _Network, step: int) -> _Network:
        """The target network of training step ``step``, ``model`` holding its parameters."""
        if self.network is None:
            network = copy.deepcopy(model).requires_grad_(False).eval()
            if self._restored is not None:
                network.load_state_dict(self._restored)
                self._restored = None
            else:
                self.step = step
            self.network = network
        if step > self.step:
            with torch.no_grad():
                theirs = model.state_dict()
                for name, ours in self.network.state_dict().items():
                    if ours.is_floating_point():
                        ours.lerp_(theirs[name], 1.0 - self.decay)
                    else:
                        ours.copy_(theirs[name])
            self.step = step
        return cast(_Network, self.network)

    def state(self, prefix: str) -> dict[str, Tensor]:
        weights = self.network.state_dict() if self.network is not None else self._restored
        if weights is None:
            return {}
        return {f"{prefix}step": torch.tensor(self.step)} | {
            f"{prefix}{name}": value for name, value in weights.items()
        }

    def load(self, state: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Take this target's entries out of ``state``; returns the rest."""
        ours = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        self.network = None
        if ours:
            self.step = int(ours.pop("step"))
            self._restored = ours
        return {k: v for k, v in state.items() if not k.startswith(prefix)}


class MapDistillationObjective(_FlowMapObjective):
    """Distil a teacher velocity into a flow map (Boffi, Albergo, Vanden-Eijnden 2024, Sec. 3):
    ``loss`` is LMD (default) or EMD.

    ``teacher(x, t, **kw)`` is any velocity (a trained model or an oracle). It is frozen and
    kept out of this module's parameters and ``state_dict``: a resumed run rebuilds the
    objective with the same teacher. Pairs default to the upper triangle ``s <= t``.
    """

    def __init__(
        self,
        path: AffinePath,
        teacher: VelocityField,
        loss: MapDistillationLoss = lagrangian_map_distillation_loss,
        time_pairs: TimePairSampler | None = None,
        learned_weight: bool = False,
    ) -> None:
        time_pairs = time_pairs or DiagonalSplitTimePairs(
            0.0, t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight)
        self._teacher = _frozen(teacher)
        self.loss = loss

    @property
    def teacher(self) -> VelocityField:
        return self._teacher.call

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        loss = self.loss(model, self.teacher, point.x_t, pairs.s, pairs.t, kw)
        return self._weigh(loss, pairs)


class ProgressiveMapDistillationObjective(MapDistillationObjective):
    """Progressive flow map matching, PFMM (Boffi, Albergo, Vanden-Eijnden 2024, Sec. 3).

    Phase ``k = step // phase_steps``: the teacher map is valid for ``|t - s| <= tau_k =
    tau0 2^k`` and the student trains on ``|t - s| <= min(1, 2 tau_k)`` (off-diagonal gaps shrunk
    by that factor) through two teacher jumps. Phase 0's teacher map is one Euler step of
    ``teacher``; each later phase starts from a frozen copy of the model taken at its first step.

    State (``state_dict``): ``phase``, the phase of the teacher map held, and that map's weights
    under ``teacher_map.``; a resumed run rebuilds the copy from them.
    """

    def __init__(
        self,
        path: AffinePath,
        teacher: VelocityField,
        tau0: float = 1.0 / 32.0,
        phase_steps: int = 2000,
        time_pairs: TimePairSampler | None = None,
        learned_weight: bool = False,
    ) -> None:
        loss = progressive_map_distillation_loss
        super().__init__(path, teacher, loss, time_pairs, learned_weight)
        self.tau0 = tau0
        self.phase_steps = phase_steps
        self.phase = 0
        self._teacher_map: _Frozen | None = None  # None: the Euler step of the teacher
        self._restored_map: dict[str, Tensor] | None = None  # weights of a resumed copy

    @property
    def tau(self) -> float:
        """Range of validity of the current teacher map: ``tau0 2^phase``."""
        return self.tau0 * 2.0**self.phase

    def _euler_teacher_map(self, x: Tensor, s: Tensor, t: Tensor, **kw: Any) -> Tensor:
        return euler_step(self.teacher, x, s, t, kw)

    def _teacher_map_at(self, model: FlowMap, step: int) -> TwoTimeField:
        """The teacher map of ``step``'s phase: a frozen copy of ``model`` made when the phase
        begins (or rebuilt from the weights a resumed run loaded)."""
        if self._restored_map is not None:
            copy_ = copy.deepcopy(model)
            if not isinstance(copy_, nn.Module):
                raise TypeError("restoring a PFMM teacher map needs an nn.Module flow map")
            copy_.load_state_dict(self._restored_map)
            self._teacher_map, self._restored_map = _frozen(copy_), None
        if step // self.phase_steps > self.phase:
            self._teacher_map = _frozen(copy.deepcopy(model))
            self.phase = step // self.phase_steps
        return self._teacher_map.call if self._teacher_map is not None else self._euler_teacher_map

    def forward(
        self,
        model: FlowMap,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        teacher_map = self._teacher_map_at(model, step)
        t = pairs.s + min(1.0, 2.0 * self.tau) * (pairs.t - pairs.s)
        pairs = TimePairs(s=pairs.s, t=t, num_diagonal=pairs.num_diagonal)
        loss = self.loss(model, teacher_map, point.x_t, pairs.s, pairs.t, kw)
        return self._weigh(loss, pairs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        state["phase"] = torch.tensor(self.phase)
        held = self._teacher_map
        weights = _weights(held) if held is not None else self._restored_map or {}
        state.update({f"teacher_map.{name}": value for name, value in weights.items()})
        return state

    def load_state_dict(  # type: ignore[override]
        self, state: dict[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        state = dict(state)
        if "phase" not in state:
            raise KeyError("a PFMM objective state needs its 'phase'")
        self.phase = int(state.pop("phase"))
        prefix = "teacher_map."
        weights = {k[len(prefix) :]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        self._teacher_map, self._restored_map = None, weights or None
        return super().load_state_dict(state, strict, assign)
