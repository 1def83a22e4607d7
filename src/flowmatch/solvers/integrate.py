"""The integration loop: ``integrate(field, x, method, time_grid)`` and ``sample``.

Fixed-step rules (Euler, midpoint, Heun, RK4), flow-map jumps and the stochastic samplers of
:mod:`flowmatch.solvers.sde` (Euler-Maruyama, gamma-sampling of a flow map) run through one loop
over an explicit time grid; ``dopri5`` (adaptive Dormand-Prince 5(4)) is delegated to
torchdiffeq. Every call counts the function evaluations (NFE). Finiteness is checked once at the
end, not per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torchdiffeq
from torch import Tensor

from flowmatch.paths.schedules import Schedule
from flowmatch.solvers.sde import Diffusion, Stepper, euler_maruyama_stepper, gamma_stepper
from flowmatch.solvers.steps import STEP_RULES
from flowmatch.solvers.time_grids import check_time_grid, uniform_time_grid
from flowmatch.types import TwoTimeField, VelocityField

METHODS = (*STEP_RULES, "dopri5", "euler_maruyama")


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


def _stepper(
    field: VelocityField | TwoTimeField,
    method: str,
    times: Tensor,
    schedule: Schedule | None,
    diffusion: Diffusion | float | None,
    gamma: float | None,
    generator: torch.Generator | None,
    model_kwargs: dict[str, Any],
) -> tuple[Stepper, int]:
    """The step ``(k, x_k) -> x_{k+1}`` of a fixed-grid method over ``times [T, B]`` and its NFE
    per step."""
    if method != "euler_maruyama" and gamma is None:
        rule = STEP_RULES[method]

        def step(k: int, x: Tensor) -> Tensor:
            return rule.step(field, x, times[k], times[k + 1], model_kwargs)

        return step, rule.nfe
    if schedule is None:
        raise ValueError(f"stochastic sampling with {method!r} needs the path's schedule=")
    if not bool(times[-1, 0] > times[0, 0]):
        raise ValueError("stochastic sampling runs forwards: the time grid must increase")
    if gamma is not None:
        stepper = gamma_stepper(field, times, schedule, gamma, generator, model_kwargs)
        return stepper, STEP_RULES["flow_map"].nfe
    if diffusion is None:
        raise ValueError("method 'euler_maruyama' needs diffusion= (a float or a schedule)")
    stepper = euler_maruyama_stepper(field, times, schedule, diffusion, generator, model_kwargs)
    return stepper, STEP_RULES["euler"].nfe


def integrate(
    field: VelocityField | TwoTimeField,
    x: Tensor,
    method: str = "rk4",
    *,
    steps: int | None = None,
    time_grid: Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    schedule: Schedule | None = None,
    diffusion: Diffusion | float | None = None,
    gamma: float | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    check_finite: bool = True,
) -> IntegrationResult:
    """Carry ``x`` along ``time_grid`` with ``method``.

    ``field`` is a velocity ``(x, t, **model_kwargs)`` for the ODE methods and
    ``euler_maruyama``, and a flow map ``(x, s, t, **model_kwargs)`` for ``method="flow_map"``.
    For ``dopri5`` the grid gives the output times (the solver chooses its own steps, shared
    across the batch).

    Stochastic sampling (:mod:`flowmatch.solvers.sde`) runs forwards on an increasing grid,
    draws from ``generator`` and needs the path's ``schedule``: ``method="euler_maruyama"``
    samples the SDE with diffusion ``eps_t`` given by ``diffusion`` (a constant, or a
    ``ConstantDiffusion`` / ``VanishingDiffusion`` or any ``eps(t)``), its score converted
    from the velocity; ``method="flow_map"`` with ``gamma`` in [0, 1] re-noises between the
    jumps (gamma-sampling; ``gamma=None``, the default, is plain jumps). Deterministic methods
    ignore ``schedule`` and ``generator``.

    Gradients are tracked only when the caller enables them for ``x`` (``x.requires_grad``), as
    in :func:`sample`: the result of a plain call does not require grad.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
        return _integrate(
            field, x, method, steps, time_grid, atol, rtol, schedule, diffusion, gamma,
            generator, model_kwargs, return_trajectory, check_finite,
        )  # fmt: skip


def _integrate(
    field: VelocityField | TwoTimeField,
    x: Tensor,
    method: str,
    steps: int | None,
    time_grid: Tensor | None,
    atol: float,
    rtol: float,
    schedule: Schedule | None,
    diffusion: Diffusion | float | None,
    gamma: float | None,
    generator: torch.Generator | None,
    model_kwargs: dict[str, Any] | None,
    return_trajectory: bool,
    check_finite: bool,
) -> IntegrationResult:
    model_kwargs = model_kwargs or {}
    grid = resolve_time_grid(x, method, steps, time_grid)
    if diffusion is not None and method != "euler_maruyama":
        raise ValueError(f"diffusion= is for method 'euler_maruyama', not {method!r}")
    if gamma is not None and method != "flow_map":
        raise ValueError(f"gamma= is for method 'flow_map', not {method!r}")
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
        times = grid[:, None].expand(-1, batch)  # [T, B] views, no per-step allocation
        step, nfe_per_step = _stepper(
            field, method, times, schedule, diffusion, gamma, generator, model_kwargs
        )
        states_list = [x] if return_trajectory else None
        for k in range(grid.numel() - 1):
            x = step(k, x)
            if states_list is not None:
                states_list.append(x)
        nfe = nfe_per_step * (grid.numel() - 1)
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
    schedule: Schedule | None = None,
    diffusion: Diffusion | float | None = None,
    gamma: float | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Map source samples ``x0 [B, *dims]`` to time 1 (or the grid's end): a tensor like ``x0``.

    Runs under ``torch.inference_mode`` unless gradients are enabled by the caller for ``x0``.
    See :func:`integrate` for the arguments (stochastic sampling included) and for NFE and
    trajectories.
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
            schedule=schedule,
            diffusion=diffusion,
            gamma=gamma,
            generator=generator,
            model_kwargs=model_kwargs,
        ).x
