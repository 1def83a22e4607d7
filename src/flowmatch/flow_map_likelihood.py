"""Few-step likelihood of a flow map by the discrete change of variables (low-dimensional data).

This module owns ``log p_1(x) = log p_0(X_{1,0}(x)) + log|det grad_x X_{1,0}(x)|``, the change
of variables for ``p_0 = (X_{1,0})_# p_1`` (``X_{1,0}`` inverts ``X_{0,1}`` by the semigroup
property of the flow map: Boffi, Albergo & Vanden-Eijnden 2025, Prop. 2.2), where ``X_{1,0}`` is
the backward map run as ``steps`` jumps ``X_{t_{k}, t_{k+1}}`` on a grid from 1 to 0. The
Jacobian is exact: ``torch.func.jacrev`` per sample, ``vmap``-ed over the batch, i.e. ``D``
reverse passes per sample, so this is for data of small dimension ``D``. It is exact for the
model's own map; how well it matches the model's ODE density depends on how close the learned
backward jumps are to the inverse of the forward ones (a learned map covering ``s > t``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flowmatch.paths.schedules import isotropic_normal_log_prob
from flowmatch.solvers.integrate import resolve_time_grid
from flowmatch.solvers.likelihood import LikelihoodResult
from flowmatch.types import TwoTimeField


def flow_map_log_likelihood(
    flow_map: TwoTimeField,
    x1: Tensor,
    *,
    steps: int | None = 1,
    time_grid: Tensor | None = None,
    log_p0: Callable[[Tensor], Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    chunk_size: int | None = None,
) -> LikelihoodResult:
    """``log p_1(x1)`` for ``x1 [B, *dims]`` through ``steps`` backward jumps of ``flow_map``.

    ``time_grid`` (decreasing, from 1 to 0) replaces ``steps``; ``log_p0`` is the source
    log-density (default ``N(0, I)``); ``chunk_size`` bounds how many samples' Jacobians are
    built at once. Returns ``LikelihoodResult(log_prob [B], nfe = jumps, x0 = X_{1,0}(x1))``.
    """
    kw = model_kwargs or {}
    log_p0 = log_p0 or isotropic_normal_log_prob
    if time_grid is None:
        grid = resolve_time_grid(x1, "flow_map", steps, None, t_start=1.0, t_end=0.0)
    else:
        grid = resolve_time_grid(x1, "flow_map", None, time_grid)
    dims = x1.shape[1:]
    times = grid[:, None]  # [T, 1]: each vmapped call sees a batch of one

    def backward_map(x_flat: Tensor, sample_kwargs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = x_flat.reshape(1, *dims)
        one = {k: v[None] for k, v in sample_kwargs.items()}
        for k in range(grid.numel() - 1):
            x = flow_map(x, times[k], times[k + 1], **one)
        x_flat = x.reshape(-1)
        return x_flat, x_flat

    jacobian = torch.func.vmap(torch.func.jacrev(backward_map, has_aux=True), chunk_size=chunk_size)
    with torch.no_grad():
        jac, x0 = jacobian(x1.reshape(x1.shape[0], -1), kw)
        log_det = torch.linalg.slogdet(jac).logabsdet
        x0 = x0.reshape(x1.shape)
        return LikelihoodResult(
            log_prob=log_p0(x0) + log_det, nfe=grid.numel() - 1, x0=x0, log_prob_stderr=None
        )
