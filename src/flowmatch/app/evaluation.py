"""Generating from a trained run and measuring it: sample distances with their noise levels,
quality against the number of steps, and negative log-likelihood with its NFE.

Everything draws from an explicit seed, so an evaluation is reproducible.
"""

from __future__ import annotations

import datetime
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tqdm
from torch import Tensor

from flowmatch.app.build import build_data
from flowmatch.app.config import SamplerNoise
from flowmatch.app.run_folder import RunFolder
from flowmatch.app.runs import Run, load_run
from flowmatch.data import ImageDataset, load_image_set, to_model_space, to_pixels
from flowmatch.extras import require
from flowmatch.flow_map_likelihood import flow_map_log_likelihood
from flowmatch.metrics import (
    FEATURE_EXTRACTORS,
    InceptionV3,
    energy_distance,
    image_metrics,
    load_feature_extractor,
    load_feature_file,
    load_inception,
    median_bandwidth,
    mmd_rbf,
    wasserstein2,
)
from flowmatch.metrics.features import LeNet
from flowmatch.solvers import IntegrationResult, bits_per_dim, integrate, log_likelihood
from flowmatch.training.config import ConfigError
from flowmatch.training.files import check_inside
from flowmatch.training.run import RunDir
from flowmatch.types import TwoTimeField, VelocityField


def default_method(run: Run) -> str:
    """The registry's sampler of the run's objective (flow-map runs jump with the map itself),
    else the run's ``eval.solver``."""
    return run.objective.default_solver or run.config.eval.solver


def sampler_noise(run: Run, method: str, noise: SamplerNoise | None) -> SamplerNoise:
    """``noise`` with the flow-map jumps' ``gamma`` set to the objective's ``jump_gamma`` when
    unset: a consistency model's jumps re-noise (Song et al. 2023, Algorithm 1)."""
    noise = noise or SamplerNoise()
    gamma = run.objective.jump_gamma
    if method == "flow_map" and noise.gamma is None and gamma is not None:
        return replace(noise, gamma=gamma)
    return noise


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


CPU = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where sampling and likelihoods run: on ``device`` (the run's network is moved there),
    ``batch_size`` items at a time (``None``: all at once). The draws for all items are made
    first on the CPU from the seed, so fixed-step solvers and flow maps give the same items for
    any chunk size; dopri5 picks its adaptive steps per chunk."""

    device: torch.device = CPU
    batch_size: int | None = None

    def chunks(self, n: int) -> list[slice]:
        """The slices of ``n`` items, ``batch_size`` at a time."""
        size = self.batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _joined(results: list[IntegrationResult]) -> IntegrationResult:
    """The chunks' results as one (on the CPU): items concatenated, the largest NFE."""
    trajectories = [r.trajectory for r in results]
    return IntegrationResult(
        x=torch.cat([r.x.cpu() for r in results]),
        nfe=max(r.nfe for r in results),
        time_grid=results[0].time_grid.cpu(),
        trajectory=None
        if trajectories[0] is None
        else torch.cat([t.cpu() for t in trajectories if t is not None], dim=1),
    )


class SamplingProgress:
    """Progress of one integration from ``t = 0`` to 1, read from the times the solver asks the
    field for (so it needs no hook in the solver, and fits adaptive steps): a tqdm bar in percent
    of the time range on a terminal, else a plain line on stderr at every tenth once
    ``quiet_for`` seconds have passed (short runs stay quiet), each with the NFE so far and an
    ETA. ``wrap(field)`` returns the field that reports."""

    def __init__(self, label: str, quiet_for: float = 5.0) -> None:
        self.label, self.nfe, self.shown, self.quiet_for = label, 0, 0, quiet_for
        self.start = time.perf_counter()
        self.bar: tqdm.tqdm | None = None
        if sys.stderr.isatty():
            self.bar = tqdm.tqdm(total=100, desc=label, unit="%", dynamic_ncols=True)

    def wrap(self, field: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def reporting(x: Tensor, *times: Tensor, **model_kwargs: Tensor) -> Tensor:
            self.update(float(torch.as_tensor(times[-1]).max()))
            return field(x, *times, **model_kwargs)

        return reporting

    def update(self, t: float) -> None:
        self.nfe += 1
        done = min(100, int(100 * t + 1e-4))  # t arrives in float32
        if self.bar is not None:
            self.bar.update(max(0, done - self.bar.n))
            self.bar.set_postfix(nfe=self.nfe, refresh=False)
            return
        elapsed = time.perf_counter() - self.start
        if done >= self.shown + 10 and elapsed >= self.quiet_for:
            self.shown = done - done % 10
            eta = datetime.timedelta(seconds=round(elapsed * (100 - done) / done))
            print(
                f"{self.label}: {done}% of t, {self.nfe} NFE, {elapsed:.0f} s, eta {eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    progress: bool = False,
    noise: SamplerNoise | None = None,
    contexts: Tensor | None = None,
    placement: Placement | None = None,
) -> IntegrationResult:
    """``n`` samples of the run from source draws of ``seed``.

    ``method="flow_map"`` jumps with the learned map (``steps`` jumps, default 1); the ODE
    methods integrate the velocity (a flow map's diagonal). Conditional runs take ``labels [n]``
    (default: classes in turn), context-conditioned runs ``contexts [n, C]`` or one ``[C]`` for
    all (rows of NaN: no context), both with an optional ``guidance`` scale. ``noise`` sets the
    stochastic samplers (``euler_maruyama``, ``flow_map`` with ``gamma``; unset, the objective's
    ``jump_gamma``), which draw from the same generator as the source, after it (on another
    device, from a generator there seeded by it; with ``placement.batch_size`` the chunks draw
    in turn). ``progress`` reports on stderr with an ETA (``SamplingProgress``). ``placement``:
    the device and chunk size.
    """
    placement = placement or Placement()
    method = method or default_method(run)
    noise = sampler_noise(run, method, noise)
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
    run.model.to(placement.device)
    if placement.device.type != "cpu":  # the stochastic samplers draw on the device
        seed_there = int(torch.randint(2**62, (1,), generator=generator))
        generator = torch.Generator(placement.device).manual_seed(seed_there)
    chunks = placement.chunks(n)
    results = []
    for index, part in enumerate(chunks):
        label = f"sampling {n} ({method})" + (f" {index + 1}/{len(chunks)}" if chunks[1:] else "")
        reporter = SamplingProgress(label) if progress else None
        try:
            with torch.inference_mode():
                results.append(
                    integrate(
                        field if reporter is None else reporter.wrap(field),
                        x0[part].to(placement.device),
                        method,
                        steps=None if method == "dopri5" else steps,
                        model_kwargs={
                            k: v[part].to(placement.device) for k, v in model_kwargs.items()
                        },
                        return_trajectory=return_trajectory,
                        **noise.integrate_kwargs(run.path.schedule, method, generator),
                    )
                )
        finally:
            if reporter is not None:
                reporter.close()
    return _joined(results)


W2_MAX_ROWS = 5000  # exact W2 is an O(n^3) assignment: above this many rows it is left out


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
    """Distances between ``n`` model samples and ``n`` reference samples, and the same distances
    from a second independent sample to the reference (the noise level at that size).

    ``reference`` says what was compared with: fresh target samples (2-D toys), or an array
    run's held-out rows, with ``n`` of its training rows as the second sample. ``w2`` is
    ``None`` above ``W2_MAX_ROWS``; the MMD bandwidth is the median heuristic on the reference.
    """

    method: str
    steps: int | None
    nfe: int
    n: int
    energy: float
    energy_noise: float
    w2: float | None
    w2_noise: float | None
    mmd: float
    mmd_noise: float
    reference: str = "target"


def _sample_distances(samples: Tensor, reference: Tensor, other: Tensor) -> dict[str, Any]:
    """Energy, W2 (up to ``W2_MAX_ROWS`` rows) and MMD of ``samples`` and of ``other`` (the
    noise level) against ``reference``; items of any shape are compared flattened."""
    bandwidth = median_bandwidth(reference)
    distances: dict[str, Any] = {
        "energy": float(energy_distance(samples, reference)),
        "energy_noise": float(energy_distance(other, reference)),
        "w2": None,
        "w2_noise": None,
        "mmd": float(mmd_rbf(samples, reference, bandwidth)),
        "mmd_noise": float(mmd_rbf(other, reference, bandwidth)),
    }
    if reference.shape[0] <= W2_MAX_ROWS:
        distances["w2"] = float(wasserstein2(samples, reference))
        distances["w2_noise"] = float(wasserstein2(other, reference))
    return distances


def sample_quality(
    run: Run,
    target: Any,
    method: str,
    steps: int | None,
    n: int,
    seed: int = 0,
    progress: bool = False,
    noise: SamplerNoise | None = None,
    placement: Placement | None = None,
) -> SampleQuality:
    """Energy distance, exact W2 and MMD of the run's samples against ``target.sample``; a
    context-conditioned run samples at contexts drawn from the target (the marginal)."""
    contexts = None
    if run.spec.context_dim is not None:
        contexts = target.sample_context(n, torch.Generator().manual_seed(seed + 5))
    result = generate(
        run,
        n,
        method=method,
        steps=steps,
        seed=seed,
        noise=noise,
        contexts=contexts,
        progress=progress,
        placement=placement,
    )
    generator = torch.Generator().manual_seed(seed + 1)
    reference, other = target.sample(n, generator), target.sample(n, generator)
    return SampleQuality(
        method=method,
        steps=steps if method != "dopri5" else None,
        nfe=result.nfe,
        n=n,
        **_sample_distances(result.x.float(), reference, other),
    )


def held_out_quality(
    run: Run,
    train: Tensor,
    held_out: Tensor,
    method: str,
    steps: int | None,
    n: int,
    seed: int = 0,
    progress: bool = False,
    noise: SamplerNoise | None = None,
    placement: Placement | None = None,
) -> SampleQuality:
    """The distances of ``sample_quality`` against an array run's held-out rows: ``min(n, rows)``
    model samples and as many distinct training rows (the noise level: how far the training data
    itself lies from the held-out rows)."""
    n = min(n, held_out.shape[0], train.shape[0])
    result = generate(
        run,
        n,
        method=method,
        steps=steps,
        seed=seed,
        progress=progress,
        noise=noise,
        placement=placement,
    )
    generator = torch.Generator().manual_seed(seed + 1)
    reference = held_out[torch.randperm(held_out.shape[0], generator=generator)[:n]]
    other = train[torch.randperm(train.shape[0], generator=generator)[:n]]
    return SampleQuality(
        method=method,
        steps=steps if method != "dopri5" else None,
        nfe=result.nfe,
        n=n,
        reference=f"{n} held-out rows (data.val_fraction={run.config.data.val_fraction})",
        **_sample_distances(result.x.float(), reference.float(), other.float()),
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
    run: Run,
    target: Any,
    n: int,
    seed: int = 0,
    jumps: int | None = None,
    placement: Placement | None = None,
) -> Likelihood:
    """NLL by the exact-divergence ODE likelihood (dopri5, atol = rtol = 1e-5) or, with
    ``jumps``, through that many backward jumps of a flow-map run and the log-determinants of
    their Jacobians (meaningful for runs trained on both time orders); in the chunks of
    ``placement`` (the NFE is the largest chunk's)."""
    placement = placement or Placement()
    x1 = target.sample(n, torch.Generator().manual_seed(seed + 2))
    log_p0 = run.path.schedule.source_log_prob
    run.model.to(placement.device)
    log_probs, nfe = [], 0
    for part in placement.chunks(n):
        chunk = x1[part].to(placement.device)
        if jumps is None:
            res = log_likelihood(run.velocity(), chunk, log_p0=log_p0, method="dopri5")
        else:
            res = flow_map_log_likelihood(run.model, chunk, steps=jumps, log_p0=log_p0)
        log_probs.append(res.log_prob.cpu())
        nfe = max(nfe, res.nfe)
    nll = -torch.cat(log_probs)
    exact = None
    if hasattr(target, "log_prob"):
        exact = float(-target.log_prob(x1).mean())
    return Likelihood(
        nll=float(nll.mean()),
        nfe=nfe,
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


def feature_extractor_of(
    run: Run, inception_weights: str | None, features: str | None
) -> LeNet | InceptionV3:
    """The extractor an image run is measured in: ``features`` (a LeNet file), Inception-v3
    from ``inception_weights``, else the classifier shipped for the run's dataset."""
    name = run.config.data.name
    if features is not None:
        return load_feature_file(features)
    if inception_weights is not None:
        return load_inception(inception_weights)
    if name in FEATURE_EXTRACTORS:
        return load_feature_extractor(name)
    raise ValueError(
        f"no feature classifier ships for {name!r} (they cover {', '.join(FEATURE_EXTRACTORS)}); "
        "pass --features FILE (scripts/train_feature_classifier.py folder trains one on your "
        "labels) or --inception-weights FILE"
    )


def image_quality(
    run: Run,
    reference: Tensor,
    method: str,
    steps: int | None,
    n: int,
    seed: int = 0,
    guidance: float | None = None,
    inception_weights: str | None = None,
    features: str | None = None,
    progress: bool = False,
    noise: SamplerNoise | None = None,
    placement: Placement | None = None,
    contexts: Tensor | None = None,
) -> ImageQuality:
    """Sample quality of an image run against ``reference`` images (uint8 pixels), in the
    features of the user's LeNet file ``features`` (trained on their labels by
    ``scripts/train_feature_classifier.py``), of Inception-v3 given the local weights file of
    pytorch-fid (checked by its hash), or of the dataset's shipped classifier. A
    context-conditioned run samples at the reference images' ``contexts [N, C]``, one each."""
    extractor = feature_extractor_of(run, inception_weights, features)
    n = min(n, reference.shape[0])  # a small test split: as many samples as test images
    reference = to_model_space(reference[:n], run.spec.levels or 256)
    result = generate(
        run,
        n,
        method=method,
        steps=steps,
        seed=seed,
        guidance=guidance,
        progress=progress,
        noise=noise,
        contexts=None if contexts is None else contexts[:n],
        placement=placement,
    )
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
    run: Run,
    test: ImageDataset,
    n: int,
    seed: int = 0,
    probes: int = 1,
    placement: Placement | None = None,
) -> BitsPerDim:
    """Hutchinson ODE likelihood (dopri5, atol = rtol = 1e-5) of ``n`` test images (given their
    labels or contexts, for a class- or context-conditioned run) under the
    dequantisation ``y = 2 (v + u) / L - 1``; ``bpd = -log p(y) / (D ln 2) + log2(L / 2)``.
    The images are drawn on the CPU, the probes on the placement's device; chunks of
    ``placement.batch_size`` images (default 100)."""
    placement = placement or Placement(batch_size=100)
    device = placement.device
    generator = torch.Generator().manual_seed(seed + 4)
    drawn = test.sample_labelled(n, generator)
    probe_generator = torch.Generator(device).manual_seed(seed + 5)
    conditions: dict[str, Tensor] = {}  # then log p(x | y) or log p(x | c) at the true ones
    if run.spec.num_classes is not None:
        if drawn.label is None:
            raise ValueError("a class-conditional run needs a labelled test split")
        conditions["y"] = drawn.label
    if run.spec.context_dim is not None:
        if drawn.context is None:
            raise ValueError("a context-conditioned run needs the test images' contexts")
        conditions["context"] = drawn.context
    dims = drawn.x1[0].numel()
    bpd, nfe = [], 0
    run.model.to(device)
    for part in placement.chunks(n):
        res = log_likelihood(
            run.velocity(),
            drawn.x1[part].to(device),
            divergence="hutchinson",
            probes=probes,
            generator=probe_generator,
            log_p0=run.path.schedule.source_log_prob,
            model_kwargs={k: v[part].to(device) for k, v in conditions.items()} or None,
        )
        bpd.append(bits_per_dim(res.log_prob.cpu(), dims, test.levels))
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
    features: str | None = None,
    progress: bool = False,
    noise: SamplerNoise | None = None,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """The report of ``flowmatch eval``: quality at each step count and the likelihood.

    2-D toy runs: energy distance, W2 and MMD against fresh target samples and the NLL beside
    the exact value; array runs (any item shape): the same distances against their held-out
    rows; image runs: Frechet distance, KID and precision/recall against the test split (a
    folder's ``data.test_fraction``; a folder with contexts is sampled at its test images'
    contexts) in the features of a shipped classifier, the user's LeNet file ``features`` or
    Inception-v3, and bits/dim (given the contexts). ``progress``: each sampling reports on
    stderr with an ETA, and each likelihood says when it starts. ``noise`` sets the
    stochastic samplers (as in :func:`generate`); the report's ``sampler`` names the method with
    its noise. ``placement``: the device and chunk size of sampling and likelihoods.
    """
    placement = placement or Placement()
    method = method or default_method(run)
    noise = sampler_noise(run, method, noise)
    n = run.config.eval.samples if n is None else n
    requested: list[int | None] = [*steps] if steps else [None]
    for count in requested:
        check_sampling(run, method, count, n, guidance, noise)
    image = len(run.spec.shape) == 3 and run.spec.levels is not None
    if inception_weights is not None and not image:
        raise ConfigError("--inception-weights applies to image runs")
    if features is not None and not image:
        raise ConfigError("--features applies to image runs")
    if features is not None and inception_weights is not None:
        raise ConfigError("--features and --inception-weights are alternatives: pass one")
    counts: list[int | None] = [None]  # dopri5 picks its own steps
    if method != "dopri5":
        counts = [*steps] if steps else [run.config.eval.steps or 16]
    report: dict[str, Any] = {"run": str(run.run_dir), "step": run.step, "method": method}
    report.update(sampler=noise.label(method), noise=asdict(noise))
    if image:
        extractor = (inception_weights, features)
        report.update(
            _image_report(
                run, method, counts, n, seed, guidance, extractor, nll, progress, noise, placement
            )
        )
    else:
        if guidance is not None:
            raise ConfigError("--guidance applies to class-conditional image runs")
        report.update(_vector_report(run, method, counts, n, seed, nll, progress, noise, placement))
    return report


def _announce(progress: bool, what: str) -> None:
    if progress:
        print(f"{what} ...", file=sys.stderr, flush=True)


def _vector_report(
    run: Run,
    method: str,
    counts: list,
    n: int,
    seed: int,
    nll: bool,
    progress: bool,
    noise: SamplerNoise,
    placement: Placement,
) -> dict:
    data = build_data(run.config)
    target = data.target if data.target is not None else data.validation
    if target is None:
        raise ConfigError(
            f"the {run.config.data.name!r} run holds no rows out (data.val_fraction=0): "
            "retrain with data.val_fraction above 0 to evaluate it"
        )
    if data.target is None and run.spec.context_dim is not None:
        raise ConfigError(
            "flowmatch eval measures context runs against a known conditional law (e.g. "
            "gaussian-context); sample a context array run with flowmatch sample --context FILE"
        )

    def measure(of: Run, how: str, steps: int | None) -> dict:
        own = noise if how == method else None  # the run's sampler, not the teacher's Euler
        if data.target is not None:
            quality = sample_quality(of, data.target, how, steps, n, seed, progress, own, placement)
            return asdict(quality)
        train, held_out = data.train.data, target.data
        return asdict(
            held_out_quality(of, train, held_out, how, steps, n, seed, progress, own, placement)
        )

    report: dict = {"metric": "energy", **_quality_rows(run, method, counts, measure)}
    if run.spec.context_dim is not None and data.target is not None:
        report["per_context"] = [
            asdict(context_quality(run, data.target, torch.tensor(c), method, s, n, seed, noise))
            for c in data.target.eval_contexts
            for s in counts
        ]
    if nll and run.spec.context_dim is None:  # context runs: per-context rows instead
        n_nll = run.config.eval.nll_samples
        _announce(progress, f"likelihood of {n_nll} samples (dopri5, exact divergence)")
        report["likelihood"] = asdict(likelihood(run, target, n_nll, seed, None, placement))
        if run.is_flow_map and run.config.objective.both_orders:
            report["flow_map_likelihood"] = [
                {"jumps": k, **asdict(likelihood(run, target, n_nll, seed, k, placement))}
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
    extractor: tuple[str | None, str | None],
    nll: bool,
    progress: bool,
    noise: SamplerNoise,
    placement: Placement,
) -> dict:
    cfg = run.config.data
    test = load_image_set(cfg.name, cfg.path, "test", cfg.test_fraction, cfg.context_path)

    def measure(of: Run, how: str, steps: int | None) -> dict:
        own = noise if how == method else None  # as in _vector_report
        quality = image_quality(
            of,
            test.images,
            how,
            steps,
            n,
            seed,
            guidance,
            *extractor,
            progress=progress,
            noise=own,
            placement=placement,
            contexts=test.contexts,
        )
        return asdict(quality)

    report: dict = {"metric": "frechet_distance", **_quality_rows(run, method, counts, measure)}
    if nll:
        _announce(progress, f"bits/dim of {run.config.eval.nll_samples} test images (dopri5)")
        test_set, n_bpd = ImageDataset(test), run.config.eval.nll_samples
        chunked = Placement(placement.device, placement.batch_size or 100)
        bpd = bits_per_dim_of_run(run, test_set, n_bpd, seed, placement=chunked)
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
        plotting = require("flowmatch.plotting", "plot")
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


def pixels_in_0_255(x: Tensor, levels: int) -> Tensor:
    """Model-space images ``[N, C, H, W]`` as uint8 in ``[0, 255]``: ``to_pixels`` gives each
    pixel's cell ``0..levels-1``, stretched to 255 for fewer levels (17-level digits)."""
    cells = to_pixels(x, levels).to(torch.int32)
    return (cells * 255 // (levels - 1)).to(torch.uint8)


def write_pngs(pixels: Tensor, folder: Path) -> list[Path]:
    """One PNG per image ``pixels: uint8 [N, C, H, W]`` (C = 1 or 3) in ``folder``, named
    ``00000.png``, ``00001.png``, ...; needs pillow (``pip install flowmatch[images]``)."""
    image_module = require("PIL.Image", "images")
    out = RunDir(folder)
    paths = []
    for index, item in enumerate(pixels.numpy()):
        array = item[0] if item.shape[0] == 1 else item.transpose(1, 2, 0)
        buffer = io.BytesIO()
        image_module.fromarray(array).save(buffer, format="png")
        path = out.root / f"{index:05d}.png"
        out.write(path, buffer.getvalue())
        paths.append(path)
    return paths


def write_samples(
    run: Run, result: IntegrationResult, out: Path | None, png_dir: Path | None = None
) -> list[Path]:
    """``result`` as ``.npz`` at ``out`` (default: the run folder's ``samples.npz``; the name is
    kept as given) and a picture beside it: a scatter (and the trajectories) for 2-D runs, a PNG
    image grid (one column per class for conditional runs) for images. Image samples are
    clamped to the data range ``[-1, 1]`` and also stored as ``pixels`` (uint8 in ``[0, 255]``),
    with one PNG per sample in ``png_dir`` when given; arrays are stored as generated (a user's
    array has no fixed range). Returns the paths (``png_dir`` itself for its files)."""
    folder = RunFolder(run.run_dir)
    out = out or folder.samples
    image = len(run.spec.shape) == 3 and run.spec.levels is not None
    x = result.x.clamp(-1.0, 1.0) if image else result.x
    arrays = {"samples": x.numpy(), "time_grid": result.time_grid.numpy()}
    if image:
        assert run.spec.levels is not None
        arrays["pixels"] = pixels_in_0_255(x, run.spec.levels).numpy()
    if result.trajectory is not None:
        arrays["trajectory"] = result.trajectory.numpy()
    RunFolder(out.parent).write_npz(out, arrays)
    picture = out.with_name(out.stem + ".png")
    written = [out]
    if run.spec.shape == (2,) or image:
        plotting = require("flowmatch.plotting", "plot")
    if run.spec.shape == (2,):
        title = f"{run.run_dir.name} ({result.nfe} NFE)"
        written.append(plotting.plot_samples_2d(result.x, picture, title=title))
        if result.trajectory is not None:
            trajectories = out.with_name(RunFolder.TRAJECTORIES_PLOT)
            written.append(plotting.plot_trajectories_2d(result.trajectory, trajectories))
    elif image:  # conditional runs: one column per class
        nrow = run.spec.num_classes or 8
        scale = max(1, 64 // run.spec.shape[-1])  # 8x8 digits: 8x, 28x28: 2x
        images = x[: nrow * 8]
        written.append(plotting.save_image_grid(images, picture, nrow=nrow, scale=scale))
        if png_dir is not None:
            write_pngs(torch.from_numpy(arrays["pixels"]), png_dir)
            written.append(png_dir)
    return written
