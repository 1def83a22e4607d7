"""Two-dimensional toy distributions, scaled to unit-ish variance around the origin, with exact
log-densities where they exist, and the registry ``TOY_DATASETS``.

Each distribution draws ``sample(n, generator) -> [n, 2]`` (float32, CPU; randomness only from
``generator``), has a ``name`` (its registry key) and ``shape = (2,)``. Those with a closed-form
density also have ``log_prob(x: [B, 2]) -> [B]`` in the dtype of ``x``:

| name            | scale (per-coordinate variance)              | ``log_prob`` |
| --------------- | -------------------------------------------- | ------------ |
| checkerboard    | 4/3 (uniform on 8 unit squares in [-2, 2]^2) | exact        |
| eight-gaussians | 1 + 0.15^2 (radius sqrt(2))                  | exact        |
| moons           | x: 1 + noise^2, y: 0.326 + noise^2           | none         |
| rings           | 0.94 (radii 0.5, 1, 1.5, 2)                  | exact        |
| spirals         | about 1 (E|x|^2 = 2 + 2 noise^2)             | none         |
| gmm             | x: 1.35, y: 0.64 (three components)          | exact        |

The Gaussian mixtures are :class:`~flowmatch.oracles.GaussianMixtureOracle` targets, so their
exact velocity fields are at hand as ``.oracle.velocity``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flowmatch.data.base import draw_device
from flowmatch.oracles import GaussianMixtureOracle


class Toy2D:
    """Common attributes of the 2-D toys: ``shape = (2,)`` and a registry ``name``."""

    name: ClassVar[str]
    shape: ClassVar[tuple[int, ...]] = (2,)


@dataclass(frozen=True)
class Checkerboard(Toy2D):
    """Uniform on the 8 black squares of a 4x4 board of unit squares on ``[-2, 2]^2``.

    A square ``[i, i+1) x [j, j+1)`` is black when ``i + j`` is even. The density is ``1/8`` on
    the black squares and 0 elsewhere; mean 0, per-coordinate variance ``4/3``.
    """

    name: ClassVar[str] = "checkerboard"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = draw_device(generator)
        u = torch.rand(n, 2, generator=generator, device=device)
        # i in {-2, ..., 1}
        column = torch.randint(0, 4, (n,), generator=generator, device=device) - 2
        row_pair = torch.randint(0, 2, (n,), generator=generator, device=device)
        row = 2 * row_pair - 2 + column.remainder(2)  # j with i + j even
        return torch.stack([column, row], dim=1).to(torch.float32) + u

    def log_prob(self, x: Tensor) -> Tensor:
        """``-log 8`` on the black squares, ``-inf`` elsewhere: ``[B]``."""
        on_board = ((x >= -2) & (x < 2)).all(dim=1)
        cell = torch.floor(x)
        black = (cell[:, 0] + cell[:, 1]).remainder(2) == 0
        inside = torch.full_like(x[:, 0], -math.log(8.0))
        return torch.where(on_board & black, inside, torch.full_like(inside, -math.inf))


# The default ``gmm``: unequal weights, one isotropic and two anisotropic components (one tilted).
# Mean 0, covariance sum_k pi_k (C_k + mu_k mu_k^T) = [[1.3475, 0.025], [0.025, 0.635]].
GMM_WEIGHTS = (0.25, 0.25, 0.5)
GMM_MEANS = ((-1.5, -0.75), (1.5, -0.75), (0.0, 0.75))
GMM_COVS = (
    ((0.09, 0.0), (0.0, 0.09)),
    ((0.2, 0.1), (0.1, 0.1)),
    ((0.3, 0.0), (0.0, 0.05)),
)


class GaussianMixture2D(Toy2D):
    """``sum_k weights_k N(means_k, covs_k)`` in 2-D; the default is ``GMM_*`` above.

    ``weights: [K]``, ``means: [K, 2]``, ``covs: [K, 2, 2]``. Sampling and the exact log-density
    come from ``self.oracle`` (a :class:`~flowmatch.oracles.GaussianMixtureOracle` on the
    CondOT path with ``sigma_min = 0``, so ``log_prob`` is the mixture's own density).
    """

    name: ClassVar[str] = "gmm"

    def __init__(
        self,
        weights: Tensor | Sequence[float] = GMM_WEIGHTS,
        means: Tensor | Sequence[Sequence[float]] = GMM_MEANS,
        covs: Tensor | Sequence[Sequence[Sequence[float]]] = GMM_COVS,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[1] != 2:
            raise ValueError(f"means must have shape [K, 2], got {list(means.shape)}")
        weights = torch.as_tensor(weights, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        self.oracle = GaussianMixtureOracle(weights, means, covs)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.oracle.sample(n, generator, dtype=torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        """``logsumexp_k [log pi_k + log N(x; mu_k, C_k)]``: ``[B]``."""
        return self.oracle.log_prob(x)


class EightGaussians(GaussianMixture2D):
    """Equal mixture of ``N(mu_k, std^2 I)``, ``mu_k = radius (cos(k pi/4), sin(k pi/4))``.

    Defaults ``radius = sqrt(2)``, ``std = 0.15``: mean 0, per-coordinate variance
    ``radius^2 / 2 + std^2 = 1.0225``; neighbouring centres are ``7.2 std`` apart.
    """

    name: ClassVar[str] = "eight-gaussians"

    def __init__(self, radius: float = math.sqrt(2.0), std: float = 0.15) -> None:
        angle = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        covs = (std**2 * torch.eye(2, dtype=torch.float64)).expand(8, 2, 2)
        super().__init__(torch.full((8,), 1 / 8, dtype=torch.float64), means, covs)
        self.radius, self.std = radius, std


@dataclass(frozen=True)
class TwoMoons(Toy2D):
    """Two interleaved half circles (as in scikit-learn's ``make_moons``), centred and scaled.

    Upper moon ``(cos a, sin a)``, lower moon ``(1 - cos a, 1/2 - sin a)``, ``a ~ U[0, pi]``,
    each with probability 1/2; the points are shifted by their mean ``(1/2, 1/4)``, scaled by
    ``2/sqrt(3)`` and perturbed by ``N(0, noise^2 I)``. Per-coordinate variance: ``1 + noise^2``
    and ``(4/3)(9/16 - 1/pi) + noise^2 = 0.326 + noise^2``. No closed-form density.
    """

    noise: float = 0.1
    name: ClassVar[str] = "moons"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = draw_device(generator)
        angle = math.pi * torch.rand(n, generator=generator, device=device)
        lower = torch.rand(n, generator=generator, device=device) < 0.5
        upper_moon = torch.stack([angle.cos(), angle.sin()], dim=1)
        lower_moon = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], dim=1)
        moons = torch.where(lower[:, None], lower_moon, upper_moon)
        centred = (moons - torch.tensor([0.5, 0.25], device=moons.device)) * (2 / math.sqrt(3))
        return centred + self.noise * torch.randn(n, 2, generator=generator, device=device)


@dataclass(frozen=True)
class ConcentricRings(Toy2D):
    """Equal mixture of circles of radii ``radii``, blurred by ``N(0, noise^2 I)``.

    Exact density: with ``rho = |x|``, one blurred circle of radius ``r`` has
    ``p(x) = exp(-(rho^2 + r^2) / (2 noise^2)) I_0(r rho / noise^2) / (2 pi noise^2)``
    (``I_0`` the modified Bessel function). Per-coordinate variance
    ``mean(r^2) / 2 + noise^2 = 0.94`` for the defaults.
    """

    radii: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    noise: float = 0.05
    name: ClassVar[str] = "rings"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = draw_device(generator)
        ring = torch.randint(0, len(self.radii), (n,), generator=generator, device=device)
        radius = torch.tensor(self.radii, dtype=torch.float32, device=ring.device)[ring]
        angle = 2 * math.pi * torch.rand(n, generator=generator, device=device)
        circle = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
        return circle + self.noise * torch.randn(n, 2, generator=generator, device=device)

    def log_prob(self, x: Tensor) -> Tensor:
        """``logsumexp_k [-log K + log p_k(x)]`` with the blurred-circle ``p_k`` above: ``[B]``."""
        rho = x.norm(dim=1, keepdim=True)  # [B, 1]
        radius = torch.tensor(self.radii, dtype=x.dtype, device=x.device)  # [K]
        variance = self.noise**2
        z = radius * rho / variance
        log_bessel = torch.special.i0e(z).log() + z  # log I_0(z), stable for large z
        log_ring = (
            -(rho**2 + radius**2) / (2 * variance) + log_bessel - math.log(2 * math.pi * variance)
        )
        return torch.logsumexp(log_ring, dim=1) - math.log(len(self.radii))


@dataclass(frozen=True)
class Spirals(Toy2D):
    """Two interleaved Archimedean spirals of ``turns`` turns out to ``max_radius``.

    ``s = sqrt(u)``, ``u ~ U[0, 1]`` (uniform along the arc), point ``max_radius * s *
    (-cos a, sin a)`` with ``a = 2 pi turns s``, negated for the second arm, plus
    ``N(0, noise^2 I)``. Mean 0; ``E|x|^2 = max_radius^2 / 2 + 2 noise^2`` (about 1 per
    coordinate for the defaults). No closed-form density.
    """

    turns: float = 1.5
    max_radius: float = 2.0
    noise: float = 0.05
    name: ClassVar[str] = "spirals"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = draw_device(generator)
        s = torch.rand(n, generator=generator, device=device).sqrt()
        angle = 2 * math.pi * self.turns * s
        arm = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
        curve = (arm * self.max_radius * s)[:, None] * torch.stack([-angle.cos(), angle.sin()], 1)
        return curve + self.noise * torch.randn(n, 2, generator=generator, device=device)


TOY_DATASETS: dict[str, Callable[[], Toy2D]] = {
    cls.name: cls
    for cls in (Checkerboard, EightGaussians, TwoMoons, ConcentricRings, Spirals, GaussianMixture2D)
}
