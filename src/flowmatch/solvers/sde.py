"""Stochastic sampling: Euler-Maruyama for the SDE of an affine path, re-noised flow-map jumps.

**SDE.** For any diffusion ``eps_t >= 0`` the SDE

    dX_t = [v_t(X_t) + (eps_t / 2) s_t(X_t)] dt + sqrt(eps_t) dW_t,   X_0 ~ p_0,

has the marginals ``p_t`` of the ODE ``dX = v dt``: with ``s_t = grad log p_t``, ``p s = grad p``,
so in the Fokker-Planck equation ``d_t p = -div(p v) - div(p (eps / 2) s) + (eps / 2) lap p`` the
last two terms cancel. This is the forward SDE of Albergo, Boffi & Vanden-Eijnden (2023),
"Stochastic Interpolants: A Unifying Framework for Flows and Diffusions", with drift
``b_F = b + eps s`` and noise ``sqrt(2 eps) dW``; their ``eps`` is ``eps_t / 2`` here. The score
comes from the same velocity evaluation by the path's conversion
(:func:`flowmatch.paths.convert`, ``velocity -> score``: ``s = -x0_hat / sigma`` with
``x0_hat = (alpha v - d_alpha x) / (alpha d_sigma - sigma d_alpha)``), which is finite wherever
``sigma > 0``; it has no ``1 / alpha``, so ``t = 0`` is fine. The last step is a plain Euler step
(``eps = 0`` on the last interval, still the same marginals), so the score is never evaluated at
the grid's end, where ``sigma`` vanishes for CondOT (``sigma_min = 0``), cosine and VP at t = 1.

**Flow-map gamma-sampling.** Between jumps of a flow map, part of the way is re-noised by the
path's own Gaussian transition; see :func:`gamma_stepper`.

Both samplers are reached through :func:`flowmatch.solvers.integrate` (``method="euler_maruyama"``,
or ``method="flow_map"`` with ``gamma``), which builds a stepper here and runs its loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowmatch.paths.affine import convert
from flowmatch.paths.schedules import Schedule
from flowmatch.shapes import broadcast_time
from flowmatch.solvers.steps import euler_step, flow_map_step

Diffusion = Callable[[Tensor], Tensor]
"""A diffusion schedule ``eps(t) -> eps_t >= 0``, elementwise on a tensor of times."""

Stepper = Callable[[int, Tensor], Tensor]
"""``(k, x_k) -> x_{k+1}``: step ``k`` of a sampler over a fixed time grid."""


@dataclass(frozen=True)
class ConstantDiffusion:
    """``eps_t = scale``."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale >= 0.0:
            raise ValueError(f"the diffusion scale must be >= 0, got {self.scale}")

    def __call__(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.scale)


@dataclass(frozen=True)
class VanishingDiffusion:
    """``eps_t = 4 scale t (1 - t)``: zero at both ends, ``scale`` at its peak t = 1/2.

    Near t = 1 the score grows like ``1 / sigma_t`` where the data are concentrated; with
    ``eps_t = O(1 - t)`` the score term of the drift stays bounded there (``sigma_t ~ 1 - t``
    for CondOT and cosine).
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale >= 0.0:
            raise ValueError(f"the diffusion scale must be >= 0, got {self.scale}")

    def __call__(self, t: Tensor) -> Tensor:
        return 4.0 * self.scale * t * (1.0 - t)


def euler_maruyama_stepper(
    velocity: Callable[..., Tensor],
    times: Tensor,
    schedule: Schedule,
    diffusion: Diffusion | float,
    generator: torch.Generator | None,
    model_kwargs: dict[str, Any],
) -> Stepper:
    """Euler-Maruyama for the SDE above over the grid ``times [T, B]`` (increasing, rows equal).

    Step ``k`` (``h = t_{k+1} - t_k``, ``v = v(x, t_k)``, ``s`` its score, ``z ~ N(0, I)``):
    ``x + h (v + (eps_{t_k} / 2) s) + sqrt(eps_{t_k} h) z``; the last step and every step with
    ``eps_{t_k} = 0`` is ``x + h v`` and draws nothing. One velocity evaluation per step; the
    scheme has weak order 1 (Kloeden & Platen 1992, Ch. 14).
    """
    grid = times[:, 0]
    eps_fn = ConstantDiffusion(diffusion) if isinstance(diffusion, (int, float)) else diffusion
    eps_t = eps_fn(grid[:-1].detach().to(torch.float64)).cpu()
    if not bool(torch.isfinite(eps_t).all()) or bool((eps_t < 0).any()):
        raise ValueError("the diffusion must be finite and >= 0 on the time grid")
    eps = eps_t.tolist()
    eps[-1] = 0.0  # the last step is deterministic
    noise_std = [math.sqrt(e * h) for e, h in zip(eps, grid.diff().tolist(), strict=True)]

    def step(k: int, x: Tensor) -> Tensor:
        s, t = times[k], times[k + 1]
        if eps[k] == 0.0:
            return euler_step(velocity, x, s, t, model_kwargs)
        v = velocity(x, s, **model_kwargs)
        score = convert(schedule, v, x, s, "velocity", "score")
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        drift = v + (0.5 * eps[k]) * score
        return x + broadcast_time(t - s, x) * drift + noise_std[k] * noise

    return step


def time_of_noise_ratio(schedule: Schedule, ratio: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The time ``u`` in ``[lo, hi]`` with ``sigma(u) / alpha(u) = ratio``, by bisection.

    The ratio is decreasing in time on every schedule of ``flowmatch.paths``; 64 halvings of
    an interval inside [0, 1] reach float64 resolution.
    """
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        noisier = schedule.sigma(mid) / schedule.alpha(mid) > ratio
        lo, hi = torch.where(noisier, mid, lo), torch.where(noisier, hi, mid)
    return 0.5 * (lo + hi)


def gamma_stepper(
    flow_map: Callable[..., Tensor],
    times: Tensor,
    schedule: Schedule,
    gamma: float,
    generator: torch.Generator | None,
    model_kwargs: dict[str, Any],
) -> Stepper:
    """Gamma-sampling with a flow map over the grid ``t_0 < ... < t_N`` (``times [T, B]``).

    Kim et al. (2023), "Consistency Trajectory Models", gamma-sampling, written there for a
    variance-exploding path: from ``x_{t_n}`` jump to noise level ``sqrt(1 - gamma^2)
    (sigma_{n+1} - sigma_min) + sigma_min``, then add ``N(0, sigma_{n+1}^2 - s^2)`` noise. For an
    affine path the noise level is ``lam(t) = sigma(t) / alpha(t)`` (``x_t / alpha_t`` is the
    data plus ``lam_t`` noise), with ``lam_min = lam(t_N)``. Step ``n < N - 1``, to
    ``t = t_{n+1}``, with fresh ``z ~ N(0, I)``:

        u     = the time in [t, t_N] with lam(u) = lam_N + sqrt(1 - gamma^2) (lam(t) - lam_N)
        x_hat = X(x, t_n, u)
        x     = (alpha_t / alpha_u) x_hat + sqrt(sigma_t^2 - (alpha_t sigma_u / alpha_u)^2) z

    and the last step is the plain jump ``X(x, t_{N-1}, t_N)``. The re-noising is the path's
    transition from ``u`` back to ``t``: if ``x_hat ~ p_u`` exactly, the new ``x ~ p_t``
    exactly, for every ``gamma``. ``gamma = 0`` gives ``u = t`` and no noise: the
    deterministic jumps along the grid. ``gamma = 1`` jumps to ``u = t_N`` and re-noises from
    there: with ``t_N = 1`` and ``sigma(1) = 0`` this is ``x = alpha_t x1_hat + sigma_t z``,
    the multistep sampler of Song et al. (2023), "Consistency Models", Algorithm 1. One
    flow-map evaluation per step; ``u`` and the two coefficients are computed on the host,
    once per call.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    grid = times[:, 0].detach().to(device="cpu", dtype=torch.float64)
    target, t_end = grid[1:], grid[-1:]
    if gamma == 0.0:
        u = target.clone()
    else:

        def lam(t: Tensor) -> Tensor:
            return schedule.sigma(t) / schedule.alpha(t)

        lam_t, lam_end = lam(target), lam(t_end)
        wanted = lam_end + math.sqrt(1.0 - gamma**2) * (lam_t - lam_end)
        u = time_of_noise_ratio(schedule, wanted, target, t_end.expand_as(target))
        u = torch.where(wanted >= lam_t, target, torch.where(wanted <= lam_end, t_end, u))
    u[-1] = t_end[0]  # the last step is a plain jump
    scale = schedule.alpha(target) / schedule.alpha(u)
    noise_var = schedule.sigma(target) ** 2 - (scale * schedule.sigma(u)) ** 2
    noise_std = noise_var.clamp(min=0.0).sqrt()
    noise_std[-1] = 0.0
    scale_list, noise_list = scale.tolist(), noise_std.tolist()
    jump_to = u.to(times)[:, None].expand(-1, times.shape[1])

    def step(k: int, x: Tensor) -> Tensor:
        x = flow_map_step(flow_map, x, times[k], jump_to[k], model_kwargs)
        if noise_list[k] == 0.0:
            return x
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return scale_list[k] * x + noise_list[k] * noise

    return step
