"""Conditional flow matching (Lipman et al. 2022, eq. 9 and 23): regress ``d/dt x_t`` on ``x_t``.

``L(theta) = E_{t, x0, x1} |v_theta(x_t, t) - (d_alpha(t) x1 + d_sigma(t) x0)|^2`` with
``x_t = alpha(t) x1 + sigma(t) x0``, ``x0 ~ N(0, I)`` and ``t`` from a time sampler. Its minimiser
is the marginal velocity ``u_t(x) = E[d/dt x_t | x_t = x]`` (Theorem 2). The path, the coupling of
``(x0, x1)`` and the time density are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowmatch.paths.affine import AffinePath
from flowmatch.paths.time_samplers import UniformTimeSampler
from flowmatch.shapes import check_same_shape, check_time
from flowmatch.types import Coupling, TimeSampler, VelocityField


def conditioning(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model keywords of a batch: its labels ``y`` and its contexts ``context`` where
    present (a row of NaN is a dropped context)."""
    return {key: batch[key] for key in ("y", "context") if key in batch}


def couple(
    coupling: Coupling,
    x0: Tensor,
    x1: Tensor,
    generator: torch.Generator | None,
    condition: Tensor | None = None,
) -> Tensor:
    """``coupling(x0, x1)``, with ``condition=`` only when there is one (so a coupling written
    to the three-argument form still works on unconditional data)."""
    if condition is None:
        return coupling(x0, x1, generator=generator)
    return coupling(x0, x1, generator=generator, condition=condition)


def batch_condition(model_kwargs: Mapping[str, Tensor]) -> Tensor | None:
    """What a condition-aware coupling pairs within: the labels, else the contexts."""
    return model_kwargs.get("y", model_kwargs.get("context"))


def paired_noise(
    batch: Mapping[str, Tensor],
    coupling: Coupling | None,
    condition_aware: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """The noise ``x0 ~ N(0, I)`` of ``batch["x1"]``, paired with it by ``coupling`` (within the
    batch's labels or contexts when ``condition_aware``): the part of a training step that does
    not touch the model, which a loop may compute for the next step while this one trains."""
    x1 = batch["x1"]
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    if coupling is None:
        return x0
    condition = batch_condition(conditioning(batch)) if condition_aware else None
    return couple(coupling, x0, x1, generator, condition)


def cfm_loss(
    model: VelocityField,
    x1: Tensor,
    path: AffinePath,
    *,
    coupling: Coupling | None = None,
    time_sampler: TimeSampler | None = None,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    t: Tensor | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    condition: Tensor | None = None,
) -> Tensor:
    """Per-sample conditional flow-matching loss ``[B]``, the squared error averaged over dims.

    ``x1: [B, *dims]`` data. ``x0`` defaults to ``N(0, I)`` draws (the noise of the path
    ``x_t = alpha x1 + sigma x0``, so for VE the source ``N(0, sigma_max^2 I)`` is ``sigma(0) x0``);
    ``coupling(x0, x1)`` then reorders ``x0`` only, so ``x1`` and ``model_kwargs`` (labels) stay
    aligned; with ``condition`` (the labels or contexts of ``x1``) it is passed to the coupling,
    which then pairs within conditions (:mod:`flowmatch.couplings`). ``t: [B]`` defaults to
    ``time_sampler`` draws, by default uniform on the schedule's
    ``[t_min, t_max]``. ``model(x_t, t, **model_kwargs)`` must return the shape of ``x1``.
    """
    if x1.dim() < 2:
        raise ValueError(f"x1 must be [batch, *dims], got {list(x1.shape)}")
    batch = x1.shape[0]
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    if coupling is not None:
        x0 = couple(coupling, x0, x1, generator, condition)
    if t is None:
        if time_sampler is None:
            schedule = path.schedule
            time_sampler = UniformTimeSampler(schedule.t_min, schedule.t_max)
        t = time_sampler(batch, generator=generator, device=x1.device, dtype=x1.dtype)
    else:
        check_time(t, x1)
    sample = path.sample(x0, x1, t)
    prediction = model(sample.x_t, t, **(model_kwargs or {}))
    check_same_shape(prediction, sample.velocity, "model output", "target velocity")
    return (prediction - sample.velocity).square().reshape(batch, -1).mean(dim=1)


@dataclass
class FlowMatchingObjective:
    """The training-loop objective of conditional flow matching: :func:`cfm_loss` on a batch.

    ``objective(model, batch, step, generator) -> [B]`` with ``batch["x1"]`` the data and an
    optional ``batch["y"]`` (labels) or ``batch["context"]`` (context vectors) passed to the model
    under the same name and to the coupling as its condition (condition-aware OT pairs within
    labels; dropped labels, the null class, and dropped contexts form one more group of
    unconditional pairs); ``condition_aware=False`` keeps the condition from the coupling (plain
    OT). It holds no state.
    """

    path: AffinePath
    coupling: Coupling | None = None
    time_sampler: TimeSampler | None = None
    condition_aware: bool = True

    def prepare(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``batch`` with its paired noise ``x0`` (:func:`paired_noise`); ``__call__`` uses a
        prepared ``x0`` as it is, so preparing first draws the same numbers as not."""
        return {**batch, "x0": paired_noise(batch, self.coupling, self.condition_aware, generator)}

    def __call__(
        self,
        model: VelocityField,
        batch: Mapping[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if "x0" not in batch:
            batch = self.prepare(batch, generator)
        return cfm_loss(
            model,
            batch["x1"],
            self.path,
            x0=batch["x0"],
            time_sampler=self.time_sampler,
            generator=generator,
            model_kwargs=conditioning(batch),
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"FlowMatchingObjective has no state, got keys {sorted(state)}")
