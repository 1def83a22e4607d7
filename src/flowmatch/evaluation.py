"""Generating from a trained run and measuring it: sample distances with their noise levels,
quality against the number of steps, and negative log-likelihood with its NFE.

Everything draws from an explicit seed, so an evaluation is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowmatch.data import ImageDataset, to_model_space
from flowmatch.flow_map_likelihood import flow_map_log_likelihood
from flowmatch.metrics import (
    FEATURE_EXTRACTORS,
    energy_distance,
    image_metrics,
    load_feature_extractor,
    load_inception,
    wasserstein2,
)
from flowmatch.runs import Run
from flowmatch.solvers import IntegrationResult, bits_per_dim, integrate, log_likelihood


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
            raise ValueError(
                "guidance is applied to velocities: use an ODE solver with it, or distil the "
                "guided teacher into the flow map (objective.teacher_guidance)"
            )
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


def likelihood(
    run: Run, target: Any, n: int, seed: int = 0, jumps: int | None = None
) -> Likelihood:
    """NLL by the exact-divergence ODE likelihood (dopri5, atol = rtol = 1e-5) or, with
    ``jumps``, through that many backward jumps of a flow-map run and the log-determinants of
    their Jacobians (meaningful for runs trained on both time orders)."""
    x1 = target.sample(n, torch.Generator().manual_seed(seed + 2))
    log_p0 = run.path.schedule.source_log_prob
    if jumps is None:
        res = log_likelihood(run.velocity(), x1, log_p0=log_p0, method="dopri5")
    else:
        res = flow_map_log_likelihood(run.model, x1, steps=jumps, log_p0=log_p0)
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


@dataclass
class ImageQuality:
    """Frechet distance, KID and precision/recall of ``n`` samples against ``n`` test images,
    in the features of ``extractor`` (not comparable with Inception-based numbers)."""

    method: str
    steps: int | None
    nfe: int
    n: int
    extractor: str
    frechet_distance: float
    kid: float
    precision: float
    recall: float


def image_quality(
    run: Run,
    reference: Tensor,
    method: str,
    steps: int | None,
    n: int,
    seed: int = 0,
    guidance: float | None = None,
    inception_weights: str | None = None,
) -> ImageQuality:
    """Sample quality of an image run against ``reference`` images (uint8 pixels), in the
    features of the dataset's shipped classifier or, given the local weights file of
    pytorch-fid (checked by its hash), of Inception-v3."""
    name = run.config.data.name
    if inception_weights is not None:
        extractor: torch.nn.Module = load_inception(inception_weights)
    elif name in FEATURE_EXTRACTORS:
        extractor = load_feature_extractor(name)
    else:
        raise ValueError(
            f"no feature classifier ships for {name!r} (they cover "
            f"{', '.join(FEATURE_EXTRACTORS)}); pass --inception-weights FILE"
        )
    reference = to_model_space(reference[:n], run.spec.levels or 256)
    result = generate(run, n, method=method, steps=steps, seed=seed, guidance=guidance)
    generator = torch.Generator().manual_seed(seed + 3)
    metrics = image_metrics(
        result.x, reference, extractor, kid_subset_size=min(1000, n // 2), generator=generator
    )
    return ImageQuality(
        method=method,
        steps=steps if method != "dopri5" else None,
        nfe=result.nfe,
        n=n,
        extractor=metrics.extractor,
        frechet_distance=metrics.frechet_distance,
        kid=metrics.kid,
        precision=metrics.precision,
        recall=metrics.recall,
    )


@dataclass
class BitsPerDim:
    """Bits per dimension of ``n`` dequantised test images: the mean, its standard error over
    images (which includes the Hutchinson estimator's own noise) and the solver's NFE."""

    bpd: float
    bpd_stderr: float
    nfe: int
    n: int
    probes: int


def bits_per_dim_of_run(
    run: Run, test: ImageDataset, n: int, seed: int = 0, probes: int = 1, batch: int = 100
) -> BitsPerDim:
    """Hutchinson ODE likelihood (dopri5, atol = rtol = 1e-5) of ``n`` test images (given their
    labels, for a class-conditional run) under the
    dequantisation ``y = 2 (v + u) / L - 1``; ``bpd = -log p(y) / (D ln 2) + log2(L / 2)``."""
    generator = torch.Generator().manual_seed(seed + 4)
    drawn = test.sample_labelled(n, generator)
    conditional = run.spec.num_classes is not None  # then log p(x | y) at the true labels
    labels = drawn.label if conditional else torch.zeros(n, dtype=torch.long)
    dims = drawn.x1[0].numel()
    bpd, nfe = [], 0
    for chunk, y in zip(drawn.x1.split(batch), labels.split(batch), strict=True):
        res = log_likelihood(
            run.velocity(),
            chunk,
            divergence="hutchinson",
            probes=probes,
            generator=generator,
            log_p0=run.path.schedule.source_log_prob,
            model_kwargs={"y": y} if conditional else None,
        )
        bpd.append(bits_per_dim(res.log_prob, dims, test.levels))
        nfe = max(nfe, res.nfe)
    values = torch.cat(bpd)
    return BitsPerDim(
        bpd=float(values.mean()),
        bpd_stderr=float(values.std() / n**0.5),
        nfe=nfe,
        n=n,
        probes=probes,
    )
