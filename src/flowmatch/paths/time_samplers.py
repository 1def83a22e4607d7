"""Training-time densities on [0, 1]: ``t ~ U[0, 1]`` and logit-normal.

Each sampler is a callable ``sampler(n, generator, device, dtype) -> t: [n]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class UniformTimeSampler:
    """``t ~ U[t_min, t_max]`` (Lipman et al. 2022 use U[0, 1])."""

    t_min: float = 0.0
    t_max: float = 1.0

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self.t_min + (self.t_max - self.t_min) * u


@dataclass(frozen=True)
class LogitNormalTimeSampler:
    """``t = sigmoid(mean + std * z)``, ``z ~ N(0, 1)``, clipped to ``[t_min, t_max]``."""

    mean: float = 0.0
    std: float = 1.0
    t_min: float = 0.0
    t_max: float = 1.0

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(self.mean + self.std * z).clamp(self.t_min, self.t_max)
