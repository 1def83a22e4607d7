"""Generating from a trained run and measuring it: sample distances with their noise levels,
quality against the number of steps, and negative log-likelihood with its NFE.

Everything draws from an explicit seed, so an evaluation is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowmatch import plotting
from flowmatch.app.build import build_data
from flowmatch.app.config import SamplerNoise
from flowmatch.app.run_folder import RunFolder
from flowmatch.app.runs import Run, load_run
from flowmatch.data import ImageDataset, load_image_set, to_model_space
from flowmatch.flow_map_likelihood import flow_map_log_likelihood
from flowmatch.metrics import (
    FEATURE_EXTRACTORS,
    InceptionV3,
    energy_distance,
    image_metrics,
    load_feature_extractor,
    load_inception,
    wasserstein2,
)
from flowmatch.metrics.features import LeNet
from flowmatch.solvers import IntegrationResult, bits_per_dim, integrate, log_likelihood
from flowmatch.training.config import ConfigError
from flowmatch.training.files import check_inside
from flowmatch.types import TwoTimeField, VelocityField


def default_method(run: Run) -> str:
    """The registry's sampler of the run's objective (flow-map runs jump with the map itself),
    else the run's ``eval.solver``."""
    return run.objective.default_solver or run.config.eval.solver


def check_sampling(
    run: Run,
    method: str,
    steps: int | None,
    n: int,
    guidance: float | None,
    noise: SamplerNoise | None = None,
) -> None:
    """``ConfigError`` (one line, before any work) for sampling arguments that are out of range
    or do not apply to ``run``."""
    (noise or SamplerNoise()).check(method)
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if method == "dopri5" and steps is not None:
        raise ConfigError("--steps does not apply to dopri5 (adaptive steps): drop it")
    if method == "flow_map" and not run.is_flow_map:
        raise ConfigError("--solver flow_map needs a flow-map run; use an ODE solver")
    if guidance is not None:
        if not math.isfinite(guidance):
            raise ConfigError(f"--guidance must be a finite number, got {guidance}")
        if run.spec.num_classes is None and run.spec.context_dim is None:
            raise ConfigError("--guidance needs a class- or context-conditional run")
        if method == "flow_map":
            raise ConfigError(
                "--guidance acts on velocities: use an ODE solver with it, or distil the "
                "guided teacher into the flow map (objective.teacher_guidance)"
            )


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
    noise: SamplerNoise | None = None,
    contexts: Tensor | None = None,
) -> IntegrationResult:
    """``n`` samples of the run from source draws of ``seed``.

    ``method="flow_map"`` jumps with the learned map (``steps`` jumps, default 1); the ODE
    methods integrate the velocity (a flow map's diagonal). Conditional runs take ``labels [n]``
    (default: classes in turn), context-conditioned runs ``contexts [n, C]`` or one ``[C]`` for
    all (rows of NaN: no context), both with an optional ``guidance`` scale. ``noise`` sets the
    stochastic
    samplers (``euler_maruyama``, ``flow_map`` with ``gamma``), which draw from the same
    generator as the source, after it.
    """
    noise = noise or SamplerNoise()
    method = method or default_method(run)
    generator = torch.Generator().manual_seed(seed)
    x0 = run.source(n, generator)
    model_kwargs: dict[str, Tensor] = {}
    if run.spec.num_classes is not None:
        if labels is None:
            labels = torch.arange(n) % run.spec.num_classes
        model_kwargs["y"] = labels
    if run.spec.context_dim is not None:
        model_kwargs["context"] = _check_contexts(run, contexts, n)
    elif contexts is not None:
        raise ConfigError("contexts apply to context-conditioned runs (data with a context)")
    check_sampling(run, method, steps, n, guidance, noise)
    field: VelocityField | TwoTimeField
    if method == "flow_map":
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
            **noise.integrate_kwargs(run.path.schedule, method, generator),
        )


def _check_contexts(run: Run, contexts: Tensor | None, n: int) -> Tensor:
    """``contexts`` as ``[n, context_dim]`` (one row broadcast to all); ``ConfigError`` for a
    missing or misshapen one."""
    dim = run.spec.context_dim
    if contexts is None:
        raise ConfigError(f"a context-conditioned run needs contexts ([n, {dim}]): --context FILE")
    contexts = torch.as_tensor(contexts, dtype=torch.get_default_dtype())
    if contexts.dim() == 1 and contexts.shape[0] == dim:
        contexts = contexts.expand(n, -1)
    elif contexts.dim() == 1 and dim == 1:
        contexts = contexts[:, None]
    if contexts.shape != (n, dim):
        raise ConfigError(f"contexts must be [{dim}] or [n={n}, {dim}], got {list(contexts.shape)}")
    return contexts


def read_contexts(path: Path) -> Tensor:
    """The contexts in the ``.npy`` file ``path`` (``[C]`` or ``[n, C]``, float)."""
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not a readable .npy array ({error})") from None
    if not np.issubdtype(values.dtype, np.number):
        raise ConfigError(f"{path}: contexts must be numbers, got dtype {values.dtype}")
    return torch.as_tensor(values.astype(np.float64))


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
    run: Run,
    target: Any,
    method: str,
    steps: int | None,
    n: int,
    seed: int = 0,
    noise: SamplerNoise | None = None,
) -> SampleQuality:
    """Energy distance and exact W2 of the run's samples against ``target.sample``; a
    context-conditioned run samples at contexts drawn from the target (the marginal)."""
    contexts = None
    if run.spec.context_dim is not None:
        contexts = target.sample_context(n, torch.Generator().manual_seed(seed + 5))
    result = generate(run, n, method=method, steps=steps, seed=seed, noise=noise, contexts=contexts)
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
class ContextQuality:
    """``n`` samples of a context-conditioned run at one ``context`` against the target's exact
    conditional law there: the error of the sample mean, the sample's standard deviation (mean
    over dimensions) beside the exact one, and W2 against ``n`` fresh conditional draws with its
    noise level."""

    context: list[float]
    method: str
    steps: int | None
    nfe: int
    n: int
    mean_error: float
    std: float
    exact_std: float
    w2: float
    w2_noise: float


def context_quality(
    run: Run,
    target: Any,
    context: Tensor,
    method: str,
    steps: int | None,
    n: int,
    seed: int = 0,
    noise: SamplerNoise | None = None,
) -> ContextQuality:
    """Per-condition quality of ``run`` at ``context`` against ``target.conditional_sample``."""
    result = generate(run, n, method=method, steps=steps, seed=seed, noise=noise, contexts=context)
    generator = torch.Generator().manual_seed(seed + 6)
    rows = context.expand(n, -1)
    reference = target.conditional_sample(rows, generator)
    other = target.conditional_sample(rows, generator)
    samples = result.x.float()
    return ContextQuality(
        context=context.tolist(),
        method=method,
        steps=steps if method != "dopri5" else None,
        nfe=result.nfe,
        n=n,
        mean_error=float((samples.mean(0) - context).norm()),
        std=float(samples.std(0).mean()),
        exact_std=float(target.std),
        w2=float(wasserstein2(samples, reference.float())),
        w2_noise=float(wasserstein2(other.float(), reference.float())),
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
    noise: SamplerNoise | None = None,
) -> ImageQuality:
    """Sample quality of an image run against ``reference`` images (uint8 pixels), in the
    features of the dataset's shipped classifier or, given the local weights file of
    pytorch-fid (checked by its hash), of Inception-v3."""
    name = run.config.data.name
    if inception_weights is not None:
        extractor: LeNet | InceptionV3 = load_inception(inception_weights)
    elif name in FEATURE_EXTRACTORS:
        extractor = load_feature_extractor(name)
    else:
        raise ValueError(
            f"no feature classifier ships for {name!r} (they cover "
            f"{', '.join(FEATURE_EXTRACTORS)}); pass --inception-weights FILE"
        )
    reference = to_model_space(reference[:n], run.spec.levels or 256)
    result = generate(run, n, method=method, steps=steps, seed=seed, guidance=guidance, noise=noise)
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
    if not conditional:
        labels = torch.zeros(n, dtype=torch.long)
    elif drawn.label is None:
        raise ValueError("a class-conditional run needs a labelled test split")
    else:
        labels = drawn.label
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


def _quality_rows(
    run: Run, method: str, counts: list, measure: Callable[[Run, str, int | None], dict]
) -> dict:
    """``quality`` rows of ``run`` at each step count; for an objective the registry compares
    with its teacher, also the ``teacher_euler`` rows: the teacher's Euler solver at the same
    NFE."""
    report = {"quality": [measure(run, method, s) for s in counts]}
    teacher_dir = run.config.objective.teacher
    if method == "flow_map" and run.objective.compare_with_teacher and teacher_dir is not None:
        teacher = load_run(teacher_dir)
        report["teacher_euler"] = [measure(teacher, "euler", s) for s in counts]
    return report


def evaluate_run(
    run: Run,
    *,
    method: str | None = None,
    steps: list[int] | None = None,
    n: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    inception_weights: str | None = None,
    nll: bool = True,
    noise: SamplerNoise | None = None,
) -> dict[str, Any]:
    """The report of ``flowmatch eval``: quality at each step count and the likelihood.

    2-D toy runs: energy distance and W2 against fresh target samples and the NLL beside the
    exact value; image runs: Frechet distance, KID and precision/recall in shipped classifier
    (or Inception-v3) features against the test split, and bits/dim. ``noise`` sets the
    stochastic samplers; the report's ``sampler`` names the method with its noise.
    """
    noise = noise or SamplerNoise()
    method = method or default_method(run)
    n = run.config.eval.samples if n is None else n
    requested: list[int | None] = [*steps] if steps else [None]
    for count in requested:
        check_sampling(run, method, count, n, guidance, noise)
    if inception_weights is not None and len(run.spec.shape) != 3:
        raise ConfigError("--inception-weights applies to image runs")
    counts: list[int | None] = [None]  # dopri5 picks its own steps
    if method != "dopri5":
        counts = [*steps] if steps else [run.config.eval.steps or 16]
    report: dict[str, Any] = {"run": str(run.run_dir), "step": run.step, "method": method}
    report.update(sampler=noise.label(method), noise=asdict(noise))
    if len(run.spec.shape) == 3:
        report.update(
            _image_report(run, method, counts, n, seed, guidance, inception_weights, nll, noise)
        )
    else:
        if guidance is not None:
            raise ConfigError("--guidance applies to class-conditional image runs")
        report.update(_vector_report(run, method, counts, n, seed, nll, noise))
    return report


def _vector_report(
    run: Run, method: str, counts: list, n: int, seed: int, nll: bool, noise: SamplerNoise
) -> dict:
    data = build_data(run.config)
    if data.target is None:
        raise ConfigError(
            f"flowmatch eval measures 2-D toy runs and image runs; {run.config.data.name!r} "
            "has no target to compare with"
        )

    def measure(of: Run, how: str, steps: int | None) -> dict:
        # the noise is the run's sampler's, not the teacher's Euler comparison
        own = noise if how == method else None
        return asdict(sample_quality(of, data.target, how, steps, n, seed, own))

    report: dict = {"metric": "energy", **_quality_rows(run, method, counts, measure)}
    if run.spec.context_dim is not None:
        report["per_context"] = [
            asdict(context_quality(run, data.target, torch.tensor(c), method, s, n, seed, noise))
            for c in data.target.eval_contexts
            for s in counts
        ]
    if nll and run.spec.context_dim is None:  # context runs: per-context rows instead
        n_nll = run.config.eval.nll_samples
        report["likelihood"] = asdict(likelihood(run, data.target, n_nll, seed))
        if run.is_flow_map and run.config.objective.both_orders:
            report["flow_map_likelihood"] = [
                {"jumps": k, **asdict(likelihood(run, data.target, n_nll, seed, jumps=k))}
                for k in (1, 4)
            ]
    return report


def _image_report(
    run: Run,
    method: str,
    counts: list,
    n: int,
    seed: int,
    guidance: float | None,
    inception_weights: str | None,
    nll: bool,
    noise: SamplerNoise,
) -> dict:
    cfg = run.config.data
    test = load_image_set(cfg.name, cfg.path, "test")

    def measure(of: Run, how: str, steps: int | None) -> dict:
        own = noise if how == method else None  # as in _vector_report
        quality = image_quality(
            of, test.images, how, steps, n, seed, guidance, inception_weights, own
        )
        return asdict(quality)

    report: dict = {"metric": "frechet_distance", **_quality_rows(run, method, counts, measure)}
    if nll:
        bpd = bits_per_dim_of_run(run, ImageDataset(test), run.config.eval.nll_samples, seed)
        report["bits_per_dim"] = asdict(bpd)
    return report


def write_report(run: Run, report: dict[str, Any], steps: list[int] | None) -> Path:
    """``eval-SAMPLER[-STEPS].json`` in the run folder (``SAMPLER``: the method with its noise,
    :meth:`SamplerNoise.label`), and its quality-versus-steps plot."""
    folder = RunFolder(run.run_dir)
    sampler = report["sampler"]
    path = folder.eval_report(sampler, steps)
    folder.write_json(path, report)
    rows, metric = report["quality"], report["metric"]
    if len(rows) > 1:
        curves = {sampler: {r["steps"]: r[metric] for r in rows}}
        if "teacher_euler" in report:
            curves["teacher euler"] = {r["steps"]: r[metric] for r in report["teacher_euler"]}
        check_inside(path.with_suffix(".png").parent, folder.root)
        plotting.plot_quality_vs_steps(
            curves,
            path.with_suffix(".png"),
            metric_name=metric.replace("_", " "),
            noise_level=rows[0].get("energy_noise"),
        )
    return path


def write_samples(run: Run, result: IntegrationResult, out: Path | None) -> list[Path]:
    """``result`` as ``.npz`` at ``out`` (default: the run folder's ``samples.npz``; the name is
    kept as given) and a picture beside it: a scatter (and the trajectories) for 2-D runs, an
    image grid (one column per class for conditional runs) for images. Returns the paths."""
    folder = RunFolder(run.run_dir)
    out = out or folder.samples
    arrays = {"samples": result.x.numpy(), "time_grid": result.time_grid.numpy()}
    if result.trajectory is not None:
        arrays["trajectory"] = result.trajectory.numpy()
    RunFolder(out.parent).write_npz(out, arrays)
    picture = out.with_name(out.stem + ".png")
    written = [out]
    if run.spec.shape == (2,):
        title = f"{run.run_dir.name} ({result.nfe} NFE)"
        written.append(plotting.plot_samples_2d(result.x, picture, title=title))
        if result.trajectory is not None:
            trajectories = out.with_name(RunFolder.TRAJECTORIES_PLOT)
            written.append(plotting.plot_trajectories_2d(result.trajectory, trajectories))
    elif len(run.spec.shape) == 3:  # conditional runs: one column per class
        nrow = run.spec.num_classes or 8
        scale = max(1, 64 // run.spec.shape[-1])  # 8x8 digits: 8x, 28x28: 2x
        images = result.x[: nrow * 8]
        written.append(plotting.save_image_grid(images, picture, nrow=nrow, scale=scale))
    return written
