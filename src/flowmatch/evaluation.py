"""Generating from a trained run and measuring it: sample distances with their noise levels,
quality against the number of steps, and negative log-likelihood with its NFE.

Everything draws from an explicit seed, so an evaluation is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowmatch.metrics import energy_distance, wasserstein2
from flowmatch.runs import Run
from flowmatch.solvers import IntegrationResult, integrate, log_likelihood


def default_method(run: Run) -> str:
    """Flow-map runs jump with the map itself; velocity runs use the configured solver."""
    return "flow_map" if run.is_flow_map else run.config.eval.solver


def generate(
    run: Run,
    n: int,
    *,
    method: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    labels: Tensor | None = None,
    return_trajectory: bool = False,
) -> IntegrationResult:
    """``n`` samples of the run from source draws of ``seed``.

    ``method="flow_map"`` jumps with the learned map (``steps`` jumps, default 1); the ODE
    methods integrate the velocity (a flow map's diagonal). Conditional runs take ``labels [n]``
    (default: classes in turn) and an optional ``guidance`` scale.
    """
    method = method or default_method(run)
    generator = torch.Generator().manual_seed(seed)
    x0 = run.source(n, generator)
    model_kwargs: dict[str, Tensor] = {}
    if run.spec.num_classes is not None:
        if labels is None:
            labels = torch.arange(n) % run.spec.num_classes
        model_kwargs["y"] = labels
    if method == "flow_map":
        if not run.is_flow_map:
            raise ValueError("--solver flow_map needs a flow-map run; use an ODE solver")
        if guidance is not None:
            raise ValueError("guidance is applied to velocities; use an ODE solver with it")
        field, steps = run.model, steps or 1
    else:
        field = run.velocity(guidance)
    if method != "dopri5" and steps is None:
        steps = run.config.eval.steps or 16
    with torch.inference_mode():
        return integrate(
            field,
            x0,
            method,
            steps=None if method == "dopri5" else steps,
            model_kwargs=model_kwargs,
            return_trajectory=return_trajectory,
        )


@dataclass
class SampleQuality:
    """Distances between ``n`` model samples and ``n`` fresh target samples, and the same
    distances between two independent target samples (the noise level at that size)."""

    method: str
    steps: int | None
    nfe: int
    n: int
    energy: float
    energy_noise: float
    w2: float
    w2_noise: float


def sample_quality(
    run: Run, target: Any, method: str, steps: int | None, n: int, seed: int = 0
) -> SampleQuality:
    """Energy distance and exact W2 of the run's samples against ``target.sample``."""
    result = generate(run, n, method=method, steps=steps, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    reference, other = target.sample(n, generator), target.sample(n, generator)
    samples = result.x.float()
    return SampleQuality(
        method=method,
        steps=steps if method != "dopri5" else None,
        nfe=result.nfe,
        n=n,
        energy=float(energy_distance(samples, reference)),
        energy_noise=float(energy_distance(other, reference)),
        w2=float(wasserstein2(samples, reference)),
        w2_noise=float(wasserstein2(other, reference)),
    )


@dataclass
class Likelihood:
    """Mean negative log-likelihood (nats) of ``n`` target samples, the solver's NFE and, where
    the target has a density, the exact value and the sample's own spread."""

    nll: float
    nfe: int
    n: int
    nll_stderr: float
    exact_nll: float | None = None


def likelihood(run: Run, target: Any, n: int, seed: int = 0) -> Likelihood:
    """NLL by the exact-divergence ODE likelihood (dopri5, atol = rtol = 1e-5)."""
    x1 = target.sample(n, torch.Generator().manual_seed(seed + 2))
    res = log_likelihood(
        run.velocity(), x1, log_p0=run.path.schedule.source_log_prob, method="dopri5"
    )
    nll = -res.log_prob
    exact = None
    if hasattr(target, "log_prob"):
        exact = float(-target.log_prob(x1).mean())
    return Likelihood(
        nll=float(nll.mean()),
        nfe=res.nfe,
        n=n,
        nll_stderr=float(nll.std() / n**0.5),
        exact_nll=exact,
    )
