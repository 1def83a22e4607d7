"""Schedules ``(alpha(t), sigma(t))`` of affine probability paths, with hand-written derivatives.

An affine path is ``x_t = alpha(t) * x1 + sigma(t) * x0`` with ``x0`` the source (noise) and
``x1`` the data; t = 0 is the source end, t = 1 the data end (Lipman et al. 2022, Sec. 4).
Every method takes a tensor ``t`` of any shape and returns a tensor of the same shape.

Each schedule states the time range on which its derivatives are finite
(``t_min <= t <= t_max``) and its source distribution ``N(0, source_std^2 I)``: the law of
``x_{t_min}`` up to the ``alpha(t_min) * x1`` term, which is zero for CondOT and cosine, 0.0066 x1
for VP and negligible against ``sigma_max`` for VE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class Schedule:
    """Base class: ``alpha``, ``sigma`` and their time derivatives ``d_alpha``, ``d_sigma``."""

    t_min: float = 0.0
    t_max: float = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def source_std(self) -> float:
        """Standard deviation of the isotropic Gaussian source ``N(0, source_std^2 I)``."""
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    def sample_source(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw ``x ~ N(0, source_std^2 I)`` of the given shape."""
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return x * self.source_std if self.source_std != 1.0 else x

    def source_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; 0, source_std^2 I)`` summed over all but the batch dimension: ``[B]``."""
        return isotropic_normal_log_prob(x, self.source_std)


def isotropic_normal_log_prob(x: Tensor, std: float = 1.0) -> Tensor:
    """``log N(x; 0, std^2 I)`` for ``x: [B, *dims]``, summed over ``dims``: ``[B]``."""
    d = x[0].numel()
    sq = x.reshape(x.shape[0], -1).pow(2).sum(-1)
    return -0.5 * sq / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))


@dataclass(frozen=True)
class CondOTSchedule(Schedule):
    """Conditional optimal transport: ``alpha = t``, ``sigma = 1 - (1 - sigma_min) t``.

    Lipman et al. (2022) eq. 20; ``sigma_min = 0`` is the rectified-flow interpolant. The
    model's density at t = 1 is the data convolved with ``N(0, sigma_min^2 I)``. Valid on [0, 1].
    """

    sigma_min: float = 0.0

    def alpha(self, t: Tensor) -> Tensor:
        return t

    def sigma(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.sigma_min) * t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.sigma_min))


@dataclass(frozen=True)
class CosineSchedule(Schedule):
    """Trigonometric path: ``alpha = sin(pi t / 2)``, ``sigma = cos(pi t / 2)``. Valid on [0, 1]."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


@dataclass(frozen=True)
class VPSchedule(Schedule):
    """Variance-preserving diffusion written as a flow-matching path (Lipman et al. eq. 18-19).

    With ``r = 1 - t`` (diffusion time), ``T(r) = beta_min r + (beta_max - beta_min) r^2 / 2``:
    ``alpha(t) = exp(-T(r) / 2)``, ``sigma(t) = sqrt(1 - alpha^2) = sqrt(-expm1(-T(r)))``,
    ``d_alpha = alpha beta(r) / 2``, ``d_sigma = -alpha^2 beta(r) / (2 sigma)``.
    ``alpha(0) = 0.0066`` for the defaults, so the source is ``N(0, sigma(0)^2 I)`` only
    approximately. ``d_sigma`` is singular at t = 1 (sigma -> 0): valid on ``[0, 1 - 1e-5]``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_max: float = 1.0 - 1e-5

    def _integral(self, r: Tensor) -> Tensor:
        return self.beta_min * r + 0.5 * (self.beta_max - self.beta_min) * r * r

    def _beta(self, r: Tensor) -> Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * r

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._integral(1.0 - t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._integral(1.0 - t)))

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self._beta(1.0 - t) * self.alpha(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        r = 1.0 - t
        return -0.5 * self._beta(r) * torch.exp(-self._integral(r)) / self.sigma(t)


@dataclass(frozen=True)
class VESchedule(Schedule):
    """Variance-exploding diffusion as a flow-matching path (Lipman et al. eq. 16-17).

    ``alpha(t) = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^(1 - t)``: the source is
    ``N(x1, sigma_max^2 I)``, approximately ``N(0, sigma_max^2 I)`` for ``sigma_max`` much larger
    than the data. Valid on [0, 1].
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (1.0 - t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return -math.log(self.sigma_max / self.sigma_min) * self.sigma(t)


SCHEDULES: dict[str, type[Schedule]] = {
    "cond-ot": CondOTSchedule,
    "cosine": CosineSchedule,
    "vp": VPSchedule,
    "ve": VESchedule,
}
