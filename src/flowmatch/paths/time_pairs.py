"""Training-time densities of ``(s, t)`` pairs for flow maps.

Each sampler is a callable ``sampler(n, generator, device, dtype) -> TimePairs``. The first
``num_diagonal`` pairs have ``s = t`` (flow matching on the diagonal ``v_{t,t}``), the rest are
off the diagonal; a fixed count keeps shapes static and the split exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TimePairs:
    """Start times ``s: [n]``, end times ``t: [n]``; ``s[:num_diagonal] == t[:num_diagonal]``."""

    s: Tensor
    t: Tensor
    num_diagonal: int


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"diagonal_fraction must lie in [0, 1], got {fraction}")


@dataclass(frozen=True)
class DiagonalSplitTimePairs:
    """``floor(diagonal_fraction n)`` diagonal pairs ``s = t ~ U``, the rest uniform off it.

    Boffi, Albergo & Vanden-Eijnden (2025, Table 2): ``eta = 0.75`` of the batch on the diagonal,
    the others ``(s, t) = (min, max)`` of two ``U[t_min, t_max]`` draws (the upper triangle,
    generation direction). ``both_orders`` keeps the draws unsorted, covering the whole square,
    so backward maps ``s > t`` (data to noise) are learned too.
    """

    diagonal_fraction: float = 0.75
    both_orders: bool = False
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        _check_fraction(self.diagonal_fraction)

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TimePairs:
        num_diagonal = int(self.diagonal_fraction * n)
        u = torch.rand(2, n, generator=generator, device=device, dtype=dtype)
        u = self.t_min + (self.t_max - self.t_min) * u
        a, b = u[0, num_diagonal:], u[1, num_diagonal:]
        if not self.both_orders:
            a, b = torch.minimum(a, b), torch.maximum(a, b)
        diagonal = u[0, :num_diagonal]
        return TimePairs(
            s=torch.cat([diagonal, a]), t=torch.cat([diagonal, b]), num_diagonal=num_diagonal
        )


@dataclass(frozen=True)
class LogitNormalTimePairs:
    """MeanFlow's pairs (Geng et al. 2025, Table 1 ablations), in flowmatch time (t = 0 noise).

    Two draws ``sigmoid(mean + std z)``; off the diagonal ``(s, t) = (min, max)``; the first
    ``floor(diagonal_fraction n)`` pairs have ``t = s`` (the noisier draw). MeanFlow writes time
    with ``t = 1`` as noise, so its ``lognorm(m, std)`` is ``mean = -m`` here: the ImageNet default
    ``(-0.4, 1.0)`` with 25 % of pairs off the diagonal is this class's default.
    """

    mean: float = 0.4
    std: float = 1.0
    diagonal_fraction: float = 0.75
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        _check_fraction(self.diagonal_fraction)

    def __call__(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TimePairs:
        num_diagonal = int(self.diagonal_fraction * n)
        z = torch.randn(2, n, generator=generator, device=device, dtype=dtype)
        u = torch.sigmoid(self.mean + self.std * z).clamp(self.t_min, self.t_max)
        s, t = torch.minimum(u[0], u[1]), torch.maximum(u[0], u[1])
        t = torch.cat([s[:num_diagonal], t[num_diagonal:]])
        return TimePairs(s=s, t=t, num_diagonal=num_diagonal)
