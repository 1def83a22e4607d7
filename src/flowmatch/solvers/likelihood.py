"""Exact log-likelihood of a velocity field by the instantaneous change of variables.

For a data point ``x1`` (Lipman et al. 2022, App. C; Chen et al. 2018):
``log p_1(x1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt`` along the trajectory through ``x1``.
The augmented state ``(x, g)`` with ``g(1) = 0``, ``dx/dt = v``, ``dg/dt = div v`` is integrated
backwards from t = 1 to t = 0, so ``log p_1(x1) = log p_0(x(0)) + g(0)``.

The divergence is exact (the Jacobian's trace from one forward pass and one reverse pass per
dimension, for the whole batch at once; for low dimension) or Hutchinson's estimate
``z^T (dv/dx) z`` with P probes ``z`` drawn once per solve and held fixed along the trajectory,
the P reverse passes sharing one forward pass.
With ``dopri5`` the adaptive step is shared across the batch, so per-sample values depend
slightly (within the tolerance) on which samples share the batch.

The velocity must treat samples independently (no batch statistics): the per-sample divergence
is read from batch-wide vector-Jacobian products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from flowmatch.paths.schedules import isotropic_normal_log_prob
from flowmatch.solvers.integrate import integrate, resolve_time_grid
from flowmatch.types import VelocityField


@dataclass
class LikelihoodResult:
    """``log_prob [B]`` of the data under the model (nats), the NFE of the solve, the source
    point ``x0 [B, *dims]`` reached at t = 0 and, for Hutchinson, the standard error of
    ``log_prob`` over the probes ``log_prob_stderr [B]`` (NaN with a single probe)."""

    log_prob: Tensor
    nfe: int
    x0: Tensor
    log_prob_stderr: Tensor | None = None


def _probes(n: int, x: Tensor, noise: str, generator: torch.Generator | None) -> Tensor:
    """``[n, B, D]`` Rademacher or standard Gaussian probes, drawn on ``x``'s device."""
    shape = (n, *x.shape)
    if noise == "rademacher":
        z = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype)
        return 2.0 * z - 1.0
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown Hutchinson noise {noise!r}; use 'rademacher' or 'gaussian'")


def _velocity_and_vjps(
    velocity: VelocityField,
    x: Tensor,
    t: Tensor,
    model_kwargs: dict[str, Any],
    cotangents: Tensor,
) -> tuple[Tensor, Tensor]:
    """``v(x, t)`` and the products ``c_k^T dv/dx`` for cotangents ``c: [K, B, *dims]``, as
    ``[K, B, D]``: one forward pass and K reverse passes through its graph. (Measured on a 2-D
    MLP: 1.3x faster than replicating the batch K times, 1.4x faster than ``vmap`` over the
    reverse passes.)"""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t, **model_kwargs)
        rows = [
            torch.autograd.grad(v, x, grad_outputs=c, retain_graph=k < len(cotangents) - 1)[0]
            for k, c in enumerate(cotangents)
        ]
    return v.detach(), torch.stack(rows).reshape(len(rows), x.shape[0], -1)


def log_likelihood(
    velocity: VelocityField,
    x1: Tensor,
    *,
    divergence: Literal["exact", "hutchinson"] = "exact",
    probes: int = 1,
    noise: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    log_p0: Callable[[Tensor], Tensor] | None = None,
    method: str = "dopri5",
    steps: int | None = None,
    time_grid: Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    model_kwargs: dict[str, Any] | None = None,
) -> LikelihoodResult:
    """``log p_1(x1)`` for ``x1 [B, *dims]`` by integrating from t = 1 back to t = 0.

    ``log_p0`` is the source log-density (default ``N(0, I)``; use ``schedule.source_log_prob``
    for VP and VE paths). The time grid runs from 1 to 0 unless ``time_grid`` is given (e.g.
    ``uniform_time_grid(steps, 1 - 1e-5, 0.0)`` for VP).
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence {divergence!r}; use 'exact' or 'hutchinson'")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    model_kwargs = model_kwargs or {}
    log_p0 = log_p0 or isotropic_normal_log_prob
    shape, batch = x1.shape, x1.shape[0]
    dim = x1[0].numel()
    grid = resolve_time_grid(x1, method, steps, time_grid, t_start=1.0, t_end=0.0)
    if divergence == "exact":
        # Basis cotangents e_i, the same for every sample: row i of each sample's Jacobian.
        cotangents = torch.eye(dim, device=x1.device, dtype=x1.dtype)[:, None, :]
        cotangents = cotangents.expand(dim, batch, dim).reshape(dim, *shape)
        n_div = 1
    else:
        cotangents = _probes(probes, x1, noise, generator)
        n_div = probes

    def augmented(x: Tensor, t: Tensor, **_: Any) -> Tensor:
        """``(v, div v): [B, D + n_div]`` at the augmented state ``x = (point, g)``; a
        :class:`~flowmatch.types.VelocityField` (``integrate`` passes it no kwargs)."""
        point = x[:, :dim].reshape(shape)
        v, rows = _velocity_and_vjps(velocity, point, t, model_kwargs, cotangents)
        if divergence == "exact":
            div = torch.diagonal(rows, dim1=0, dim2=2).sum(-1, keepdim=True)  # [B, 1]
        else:
            div = (rows * cotangents.reshape(-1, batch, dim)).sum(-1).T  # [B, P]
        return torch.cat([v.reshape(batch, dim), div], dim=1)

    state1 = torch.cat([x1.reshape(batch, dim), x1.new_zeros(batch, n_div)], dim=1)
    with torch.no_grad():
        res = integrate(augmented, state1, method, time_grid=grid, atol=atol, rtol=rtol)
    x0 = res.x[:, :dim].reshape(shape)
    per_probe = log_p0(x0)[:, None] + res.x[:, dim:]  # [B, P]
    log_prob = per_probe.mean(1)
    stderr = None
    if divergence == "hutchinson":
        stderr = (
            per_probe.std(1, unbiased=True) / math.sqrt(probes)
            if probes > 1
            else torch.full_like(log_prob, float("nan"))
        )
    return LikelihoodResult(log_prob=log_prob, nfe=res.nfe, x0=x0, log_prob_stderr=stderr)


def bits_per_dim(log_prob: Tensor, dims: int, levels: int) -> Tensor:
    """Bits per dimension of data dequantised by ``flowmatch.data.to_model_space``:
    ``bpd = -log p(y) / (D ln 2) + log2(L / 2)`` (7 for 8-bit data; log2(8.5) for 17 levels).
    A uniform density on ``[-1, 1]^D`` gives exactly ``log2(L)``."""
    return -log_prob / (dims * math.log(2.0)) + math.log2(levels / 2.0)
