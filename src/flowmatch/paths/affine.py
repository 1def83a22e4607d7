"""Affine Gaussian probability paths ``x_t = alpha(t) x1 + sigma(t) x0`` and their parametrisations.

``AffinePath(schedule).sample(x0, x1, t)`` draws a point of the conditional path and its
conditional velocity ``d/dt x_t = d_alpha x1 + d_sigma x0`` (Lipman et al. 2022, eq. 13, the
regression target of conditional flow matching). ``convert`` moves a network prediction between
the four equivalent parametrisations of an affine Gaussian path: velocity, data (x1) prediction,
noise (x0) prediction and score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from flowmatch.paths.schedules import Schedule
from flowmatch.shapes import broadcast_time, check_same_shape, check_time

Prediction = Literal["velocity", "x1", "x0", "score"]


@dataclass
class PathSample:
    """A batch drawn from a conditional path: all tensors ``[B, *dims]`` except ``t: [B]``."""

    x0: Tensor
    x1: Tensor
    t: Tensor
    x_t: Tensor
    velocity: Tensor


@dataclass(frozen=True)
class AffinePath:
    """The path ``x_t = alpha(t) x1 + sigma(t) x0`` of a ``Schedule``."""

    schedule: Schedule

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """``x_t`` and the conditional velocity ``d_alpha(t) x1 + d_sigma(t) x0`` at ``t: [B]``."""
        check_same_shape(x0, x1, "x0", "x1")
        check_time(t, x1)
        tb = broadcast_time(t, x1)
        s = self.schedule
        x_t = s.alpha(tb) * x1 + s.sigma(tb) * x0
        velocity = s.d_alpha(tb) * x1 + s.d_sigma(tb) * x0
        return PathSample(x0=x0, x1=x1, t=t, x_t=x_t, velocity=velocity)

    def convert(
        self, prediction: Tensor, x_t: Tensor, t: Tensor, src: Prediction, dst: Prediction
    ) -> Tensor:
        """See :func:`convert`."""
        return convert(self.schedule, prediction, x_t, t, src, dst)


def convert(
    schedule: Schedule,
    prediction: Tensor,
    x_t: Tensor,
    t: Tensor,
    src: Prediction,
    dst: Prediction,
) -> Tensor:
    """Convert a prediction at ``(x_t, t)`` between velocity, x1, x0 and score.

    Every parametrisation is a linear function of the pair ``(x1_hat, x0_hat)`` that solves
    ``x_t = alpha x1 + sigma x0`` together with the prediction:
    velocity ``v = d_alpha x1 + d_sigma x0``, score ``s = -x0 / sigma`` (source ``N(0, I)``).
    The 2x2 system has determinant ``alpha d_sigma - sigma d_alpha`` for a velocity, nonzero
    for every schedule here on its valid range.
    """
    check_time(t, x_t)
    tb = broadcast_time(t, x_t)
    a, s = schedule.alpha(tb), schedule.sigma(tb)
    if src == "x1":
        x1 = prediction
        x0 = (x_t - a * x1) / s
    elif src == "x0":
        x0 = prediction
        x1 = (x_t - s * x0) / a
    elif src == "score":
        x0 = -s * prediction
        x1 = (x_t - s * x0) / a
    elif src == "velocity":
        da, ds = schedule.d_alpha(tb), schedule.d_sigma(tb)
        det = a * ds - s * da
        x1 = (ds * x_t - s * prediction) / det
        x0 = (a * prediction - da * x_t) / det
    else:
        raise ValueError(f"unknown prediction type {src!r}; use velocity, x1, x0 or score")
    if dst == "x1":
        return x1
    if dst == "x0":
        return x0
    if dst == "score":
        return -x0 / s
    if dst == "velocity":
        return schedule.d_alpha(tb) * x1 + schedule.d_sigma(tb) * x0
    raise ValueError(f"unknown prediction type {dst!r}; use velocity, x1, x0 or score")
