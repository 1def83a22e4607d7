"""Training objectives for flow maps: self-distillation, MeanFlow and distillation from a teacher.

This module owns the wrappers that turn the losses of :mod:`flowmatch.losses.flow_maps` into the
training loop's objective interface ``objective(model, batch, step, generator) -> loss [B]``:
they draw the path's noise ``x0 ~ N(0, I)``, the ``(s, t)`` pairs (by default on the schedule's
``[t_min, t_max]``) and any extra randomness from ``generator``, in that order, pass
``batch["y"]`` to the model as ``y`` when present, and return per-sample losses.
Objectives are ``nn.Module``s; their ``state_dict`` holds everything a resumed run needs (the
learned loss weight, the PFMM phase and teacher-map copy), never a teacher velocity.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flowmatch.losses.flow_maps import (
    LearnedLossWeight,
    adaptive_weight,
    diagonal_flow_matching_loss,
    eulerian_map_distillation_loss,
    eulerian_self_distillation_loss,
    lagrangian_map_distillation_loss,
    lagrangian_self_distillation_loss,
    meanflow_loss,
    progressive_map_distillation_loss,
    progressive_self_distillation_loss,
)
from flowmatch.paths.affine import AffinePath, PathSample
from flowmatch.paths.time_pairs import DiagonalSplitTimePairs, LogitNormalTimePairs, TimePairs
from flowmatch.solvers.steps import euler_step

TimePairSampler = Callable[..., TimePairs]


def _slice_kwargs(kw: dict[str, Tensor], index: slice) -> dict[str, Tensor]:
    return {k: v[index] for k, v in kw.items()}


def _diagonal_then_off(
    point: PathSample,
    pairs: TimePairs,
    kw: dict[str, Tensor],
    diagonal_loss: Callable[..., Tensor],
    off_diagonal_loss: Callable[..., Tensor],
) -> Tensor:
    """``diagonal_loss(x_t, t, velocity, kw)`` of the first ``num_diagonal`` samples followed by
    ``off_diagonal_loss(x_s, s, t, velocity, kw)`` of the rest: ``[B]``. An empty part is skipped
    (``torch.func.jvp`` has a fixed cost even on an empty batch)."""
    n, parts = pairs.num_diagonal, []
    if n > 0:
        d = slice(0, n)
        parts.append(
            diagonal_loss(point.x_t[d], pairs.t[d], point.velocity[d], _slice_kwargs(kw, d))
        )
    if n < pairs.s.shape[0]:
        o = slice(n, None)
        x_s, s, t, velocity = point.x_t[o], pairs.s[o], pairs.t[o], point.velocity[o]
        parts.append(off_diagonal_loss(x_s, s, t, velocity, _slice_kwargs(kw, o)))
    return torch.cat(parts)


class _FlowMapObjective(nn.Module):
    """Draws ``x0 ~ N(0, I)`` (the path's noise, as in ``cfm_loss``), ``(s, t) ~ time_pairs``
    and ``x_s = alpha_s x1 + sigma_s x0``; applies the optional learned weight ``w_{s,t}``."""

    def __init__(self, path: AffinePath, time_pairs: TimePairSampler, learned_weight: bool):
        super().__init__()
        self.path = path
        self.time_pairs = time_pairs
        self.loss_weight = LearnedLossWeight() if learned_weight else None

    def _draw(
        self, batch: dict[str, Tensor], generator: torch.Generator | None
    ) -> tuple[PathSample, TimePairs, dict[str, Tensor]]:
        x1 = batch["x1"]
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        pairs = self.time_pairs(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        model_kwargs = {"y": batch["y"]} if "y" in batch else {}
        return self.path.sample(x0, x1, pairs.s), pairs, model_kwargs

    def _weigh(self, loss: Tensor, pairs: TimePairs) -> Tensor:
        return loss if self.loss_weight is None else self.loss_weight.weigh(loss, pairs.s, pairs.t)


SelfDistillationKind = Literal["lsd", "esd", "psd-mid", "psd-uniform"]


class SelfDistillationObjective(_FlowMapObjective):
    """Flow-map self-distillation ``L_b + L_D`` (Boffi, Albergo, Vanden-Eijnden 2025; methods.md 4).

    The first ``floor(diagonal_fraction B)`` samples carry the diagonal flow-matching loss
    ``|v_{t,t}(I_t) - dI_t/dt|^2``, the rest the off-diagonal ``kind`` (LSD, ESD, PSD with the
    midpoint or a uniform ``gamma``), each optionally weighted by ``exp(-w_{s,t}) L + w_{s,t}``.
    ``both_orders`` also trains backward maps ``s > t``. The model's current parameters are
    its own teacher (no EMA teacher); dropout masks are not shared between the two calls.
    """

    def __init__(
        self,
        path: AffinePath,
        kind: SelfDistillationKind = "lsd",
        diagonal_fraction: float = 0.75,
        learned_weight: bool = False,
        both_orders: bool = False,
    ) -> None:
        if kind not in ("lsd", "esd", "psd-mid", "psd-uniform"):
            raise ValueError(f"unknown self-distillation kind {kind!r}")
        time_pairs = DiagonalSplitTimePairs(
            diagonal_fraction, both_orders, path.schedule.t_min, path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight)
        self.kind = kind

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)

        def diagonal(x_t: Tensor, t: Tensor, velocity: Tensor, kw: dict) -> Tensor:
            return diagonal_flow_matching_loss(model, x_t, t, velocity, kw)

        def distill(x_s: Tensor, s: Tensor, t: Tensor, velocity: Tensor, kw: dict) -> Tensor:
            if self.kind == "lsd":
                return lagrangian_self_distillation_loss(model, x_s, s, t, kw)
            if self.kind == "esd":
                return eulerian_self_distillation_loss(model, x_s, s, t, kw)
            gamma = (
                torch.full_like(s, 0.5)
                if self.kind == "psd-mid"
                else torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype)
            )
            return progressive_self_distillation_loss(model, x_s, s, t, gamma, kw)

        return self._weigh(_diagonal_then_off(point, pairs, kw, diagonal, distill), pairs)


class MeanFlowObjective(_FlowMapObjective):
    """MeanFlow (Geng et al. 2025; methods.md 5.1) on a flow map, in flowmatch time.

    Pairs from ``time_pairs`` (default :class:`LogitNormalTimePairs`: MeanFlow's ImageNet
    setting); diagonal samples regress ``v_{t,t}`` on ``dI_t/dt`` without a JVP, the others use
    :func:`meanflow_loss`; all are weighted by ``sg(1 / (|D|^2 + eps)^power)``. No state.
    """

    def __init__(
        self,
        path: AffinePath,
        time_pairs: TimePairSampler | None = None,
        power: float = 1.0,
        eps: float = 1e-3,
    ) -> None:
        time_pairs = time_pairs or LogitNormalTimePairs(
            t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight=False)
        self.power = power
        self.eps = eps

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)

        def diagonal(x_t: Tensor, t: Tensor, velocity: Tensor, kw: dict) -> Tensor:
            squared_error = diagonal_flow_matching_loss(model, x_t, t, velocity, kw)
            return adaptive_weight(squared_error, self.power, self.eps) * squared_error

        def mean_flow(x_s: Tensor, s: Tensor, t: Tensor, velocity: Tensor, kw: dict) -> Tensor:
            return meanflow_loss(model, x_s, s, t, velocity, self.power, self.eps, kw)

        return _diagonal_then_off(point, pairs, kw, diagonal, mean_flow)


MapDistillationKind = Literal["lmd", "emd", "pfmm"]


class MapDistillationObjective(_FlowMapObjective):
    """Distil a teacher velocity into a flow map: LMD, EMD or PFMM (Boffi et al. 2024, Sec. 3).

    ``teacher(x, t, **kw)`` is any velocity (a trained model or an oracle). It is frozen
    (``requires_grad_(False)`` and ``eval()`` if it is a module or a module's method), kept out
    of this module's parameters and out of its ``state_dict``: a resumed run rebuilds the
    objective with the same teacher, reloaded from the teacher run's own checkpoint (its path
    belongs in the run's config). Pairs default to the upper triangle (methods.md 3.2).

    PFMM (``kind="pfmm"``) is progressive: in phase ``k = step // pfmm_phase_steps`` the teacher
    map is valid for ``|t - s| <= tau_k = pfmm_tau0 2^k`` and the student trains on
    ``|t - s| <= min(1, 2 tau_k)`` (off-diagonal gaps shrunk by that factor). Phase 0's teacher map
    is one Euler step of ``teacher``; each later phase starts from a frozen copy of the model.
    The phase and that copy are in ``state_dict`` (keys ``pfmm_phase`` and ``teacher_map.*``).
    """

    def __init__(
        self,
        path: AffinePath,
        teacher: Callable[..., Tensor],
        kind: MapDistillationKind = "lmd",
        time_pairs: TimePairSampler | None = None,
        learned_weight: bool = False,
        pfmm_tau0: float = 1.0 / 32.0,
        pfmm_phase_steps: int = 2000,
    ) -> None:
        if kind not in ("lmd", "emd", "pfmm"):
            raise ValueError(f"unknown map distillation kind {kind!r}")
        time_pairs = time_pairs or DiagonalSplitTimePairs(
            0.0, t_min=path.schedule.t_min, t_max=path.schedule.t_max
        )
        super().__init__(path, time_pairs, learned_weight)
        owner = teacher if isinstance(teacher, nn.Module) else getattr(teacher, "__self__", None)
        if isinstance(owner, nn.Module):
            owner.requires_grad_(False).eval()
        # Plain attributes (not submodules): out of parameters(), state_dict() and .to().
        self.__dict__["teacher"] = teacher
        self.__dict__["_teacher_map"] = None
        self.kind = kind
        self.pfmm_tau0 = pfmm_tau0
        self.pfmm_phase_steps = pfmm_phase_steps
        self.phase = 0
        self._pending_teacher_map: dict[str, Tensor] | None = None

    @property
    def tau(self) -> float:
        """Range of validity of the current PFMM teacher map: ``pfmm_tau0 2^phase``."""
        return self.pfmm_tau0 * 2.0**self.phase

    def _euler_teacher_map(self, x: Tensor, s: Tensor, t: Tensor, **kw: Any) -> Tensor:
        return euler_step(self.teacher, x, s, t, kw)

    def _teacher_map_for(self, model: nn.Module, step: int) -> Callable[..., Tensor]:
        """The PFMM teacher map of ``step``'s phase; copies ``model`` when a new phase begins."""
        phase = step // self.pfmm_phase_steps
        if self._pending_teacher_map is not None:
            restored = copy.deepcopy(model).requires_grad_(False).eval()
            restored.load_state_dict(self._pending_teacher_map)
            self.__dict__["_teacher_map"] = restored
            self._pending_teacher_map = None
        if phase > self.phase:
            self.__dict__["_teacher_map"] = copy.deepcopy(model).requires_grad_(False).eval()
            self.phase = phase
        return self._teacher_map if self._teacher_map is not None else self._euler_teacher_map

    def forward(
        self,
        model: nn.Module,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        point, pairs, kw = self._draw(batch, generator)
        if self.kind == "lmd":
            loss = lagrangian_map_distillation_loss(
                model, self.teacher, point.x_t, pairs.s, pairs.t, kw
            )
        elif self.kind == "emd":
            loss = eulerian_map_distillation_loss(
                model, self.teacher, point.x_t, pairs.s, pairs.t, kw
            )
        else:
            teacher_map = self._teacher_map_for(model, step)
            t = pairs.s + min(1.0, 2.0 * self.tau) * (pairs.t - pairs.s)
            pairs = TimePairs(s=pairs.s, t=t, num_diagonal=pairs.num_diagonal)
            loss = progressive_map_distillation_loss(
                model, teacher_map, point.x_t, pairs.s, pairs.t, kw
            )
        return self._weigh(loss, pairs)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kind != "pfmm":
            return
        destination[prefix + "pfmm_phase"] = torch.tensor(self.phase)
        teacher_state = (
            self._teacher_map.state_dict(keep_vars=keep_vars)
            if self._teacher_map is not None
            else self._pending_teacher_map or {}
        )
        for name, value in teacher_state.items():
            destination[prefix + "teacher_map." + name] = value

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        if self.kind == "pfmm":
            phase_key, map_prefix = prefix + "pfmm_phase", prefix + "teacher_map."
            if phase_key in state_dict:
                self.phase = int(state_dict.pop(phase_key))
            elif strict:
                missing_keys.append(phase_key)
            teacher_state = {
                key[len(map_prefix) :]: state_dict.pop(key)
                for key in list(state_dict)
                if key.startswith(map_prefix)
            }
            # The copy is rebuilt from the model at the next call (this module never holds it).
            self.__dict__["_teacher_map"] = None
            self._pending_teacher_map = teacher_state or None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
