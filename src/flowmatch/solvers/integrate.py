"""The integration loop: ``integrate(field, x, method, time_grid)`` and ``sample``.

Fixed-step rules (Euler, midpoint, Heun, RK4) and flow-map jumps run through one loop over an
explicit time grid; ``dopri5`` (adaptive Dormand-Prince 5(4)) is delegated to torchdiffeq. Every
call counts the function evaluations (NFE). Finiteness is checked once at the end, not per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torchdiffeq  # type: ignore[import-untyped]  # torchdiffeq ships no type information
from torch import Tensor

from flowmatch.solvers.steps import STEP_RULES
from flowmatch.solvers.time_grids import check_time_grid, uniform_time_grid
from flowmatch.types import TwoTimeField, VelocityField

METHODS = (*STEP_RULES, "dopri5")


@dataclass
class IntegrationResult:
    """Final state ``x [B, *dims]``, the number of field evaluations, the time grid used and,
    when asked for, the states at every grid time ``trajectory [T, B, *dims]``."""

    x: Tensor
    nfe: int
    time_grid: Tensor
    trajectory: Tensor | None = None


def resolve_time_grid(
    x: Tensor,
    method: str,
    steps: int | None,
    time_grid: Tensor | None,
    t_start: float = 0.0,
    t_end: float = 1.0,
) -> Tensor:
    """The grid a call integrates over, checked: ``time_grid`` as given, else ``steps`` uniform
    steps from ``t_start`` to ``t_end`` (``dopri5``: just the two end points)."""
    if method not in METHODS:
        raise ValueError(f"unknown solver method {method!r}; choose one of {', '.join(METHODS)}")
    if steps is not None and time_grid is not None:
        raise ValueError("pass either steps= or time_grid=, not both")
    if time_grid is None:
        if steps is None:
            if method != "dopri5":
                raise ValueError(f"method {method!r} needs steps= or time_grid=")
            steps = 1
        time_grid = uniform_time_grid(steps, t_start, t_end, device=x.device, dtype=x.dtype)
    else:
        time_grid = time_grid.to(device=x.device, dtype=x.dtype)
    check_time_grid(time_grid)
    return time_grid


def integrate(
    field: VelocityField | TwoTimeField,
    x: Tensor,
    method: str = "rk4",
    *,
    steps: int | None = None,
    time_grid: Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    model_kwargs: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    check_finite: bool = True,
) -> IntegrationResult:
    """Carry ``x`` along ``time_grid`` with ``method``.

    ``field`` is a velocity ``(x, t, **model_kwargs)`` for the ODE methods and a flow map
    ``(x, s, t, **model_kwargs)`` for ``method="flow_map"``. For ``dopri5`` the grid gives the
    output times (the solver chooses its own steps, shared across the batch).
    """
    model_kwargs = model_kwargs or {}
    grid = resolve_time_grid(x, method, steps, time_grid)
    batch = x.shape[0]
    if method == "dopri5":
        nfe = 0
        velocity = cast(VelocityField, field)  # every method but "flow_map" takes a velocity

        def ode_func(t: Tensor, state: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            return velocity(state, t.expand(batch), **model_kwargs)

        states = torchdiffeq.odeint(ode_func, x, grid, method="dopri5", atol=atol, rtol=rtol)
        x_end, trajectory = states[-1], (states if return_trajectory else None)
    else:
        rule = STEP_RULES[method]
        times = grid[:, None].expand(-1, batch)  # [T, B] views, no per-step allocation
        states_list = [x] if return_trajectory else None
        for k in range(grid.numel() - 1):
            x = rule.step(field, x, times[k], times[k + 1], model_kwargs)
            if states_list is not None:
                states_list.append(x)
        nfe = rule.nfe * (grid.numel() - 1)
        x_end = x
        trajectory = torch.stack(states_list) if states_list is not None else None
    if check_finite and not bool(torch.isfinite(x_end).all()):
        raise FloatingPointError(
            f"sampling with {method!r} produced non-finite values (NaN or inf); try more steps, "
            "a smaller time range, or check the model"
        )
    return IntegrationResult(x=x_end, nfe=nfe, time_grid=grid, trajectory=trajectory)


def sample(
    field: VelocityField | TwoTimeField,
    x0: Tensor,
    method: str = "rk4",
    *,
    steps: int | None = None,
    time_grid: Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Map source samples ``x0 [B, *dims]`` to time 1 (or the grid's end): a tensor like ``x0``.

    Runs under ``torch.inference_mode`` unless gradients are enabled by the caller for ``x0``.
    See :func:`integrate` for the arguments and for NFE and trajectories.
    """
    with torch.inference_mode(mode=not (torch.is_grad_enabled() and x0.requires_grad)):
        return integrate(
            field,
            x0,
            method,
            steps=steps,
            time_grid=time_grid,
            atol=atol,
            rtol=rtol,
            model_kwargs=model_kwargs,
        ).x
