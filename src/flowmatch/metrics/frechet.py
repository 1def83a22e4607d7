"""Distances between two sets of features: Frechet distance, kernel (KID-style) distance and
k-NN precision/recall; ``image_metrics`` computes all three with one feature extractor.

With Inception-v3 pool features these are FID, KID and the precision/recall of Kynkaanniemi et
al. (2019); here the features come from whatever extractor is passed (see
``flowmatch.metrics.features``), and results carry its name. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowmatch.metrics.features import LeNet, extract_features
from flowmatch.metrics.inception import InceptionV3, inception_features


def _as_features(features: Tensor | np.ndarray, name: str) -> Tensor:
    features = torch.as_tensor(features).to(dtype=torch.float64)
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must have shape [N >= 2, F], got {list(features.shape)}")
    return features


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance_from_moments(
    mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor
) -> float:
    """``|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})``, the squared W2 distance of
    ``N(m_a, C_a)`` and ``N(m_b, C_b)``.

    ``tr (C_a C_b)^{1/2} = tr (C_a^{1/2} C_b C_a^{1/2})^{1/2}``: the eigenvalues of ``C_a C_b``
    are those of the symmetric PSD matrix ``C_a^{1/2} C_b C_a^{1/2}``, so they are real and
    only round-off (clipped at zero) can make them negative; no complex square root is needed.
    """
    mean_a, cov_a, mean_b, cov_b = (v.to(torch.float64) for v in (mean_a, cov_a, mean_b, cov_b))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(distance)


def frechet_distance(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to ``features_a: [N, F]`` and ``[M, F]``
    (sample means and unbiased covariances).
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    return frechet_distance_from_moments(a.mean(0), a.T.cov(), b.mean(0), b.T.cov())


@dataclass(frozen=True)
class KernelDistance:
    """Unbiased MMD^2 with the cubic polynomial kernel: mean and standard deviation over
    ``subsets`` random subsets of ``subset_size`` from each set."""

    mean: float
    std: float
    subset_size: int
    subsets: int


def _unbiased_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """``sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2``
    with ``k(a, b) = (a . b / F + 1)^3``."""
    m, dim = x.shape

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.T / dim + 1).pow(3)

    k_xx, k_yy = kernel(x, x), kernel(y, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (
        m * (m - 1)
    )
    return within - 2 * kernel(x, y).mean()


def kernel_inception_distance(
    features_a: Tensor | np.ndarray,
    features_b: Tensor | np.ndarray,
    subset_size: int = 1000,
    subsets: int = 100,
    generator: torch.Generator | None = None,
) -> KernelDistance:
    """KID (Binkowski et al. 2018) on any features: unbiased MMD^2 under
    ``k(a, b) = (a . b / F + 1)^3``, averaged over subsets drawn without replacement within a
    subset (``subset_size`` is capped by the smaller set).
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    m = min(subset_size, a.shape[0], b.shape[0])
    values = torch.stack(
        [
            _unbiased_mmd2(
                a[torch.randperm(a.shape[0], generator=generator)[:m].to(a.device)],
                b[torch.randperm(b.shape[0], generator=generator)[:m].to(b.device)],
            )
            for _ in range(subsets)
        ]
    )
    std = values.std() if subsets > 1 else torch.zeros((), dtype=values.dtype)
    return KernelDistance(mean=float(values.mean()), std=float(std), subset_size=m, subsets=subsets)


@dataclass(frozen=True)
class PrecisionRecall:
    """Fraction of generated points inside the real manifold (precision) and of real points
    inside the generated manifold (recall), manifolds built from ``k``-NN balls."""

    precision: float
    recall: float
    k: int


def knn_radii(features: Tensor, k: int, batch_size: int = 1000) -> Tensor:
    """Distance ``[N]`` from each point to its ``k``-th nearest other point of the same set."""
    if features.shape[0] <= k:
        raise ValueError(f"need more than k = {k} points, got {features.shape[0]}")
    radii = [
        torch.cdist(chunk, features).topk(k + 1, dim=1, largest=False).values[:, k]
        for chunk in features.split(batch_size)
    ]  # the point itself is its own nearest neighbour at distance 0, hence k + 1
    return torch.cat(radii)


def manifold_coverage(
    points: Tensor, centres: Tensor, radii: Tensor, batch_size: int = 1000
) -> float:
    """Fraction of ``points`` within ``radii[j]`` of some ``centres[j]`` (boundary included)."""
    inside = [
        (torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in points.split(batch_size)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: Tensor | np.ndarray, generated: Tensor | np.ndarray, k: int = 3, batch_size: int = 1000
) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with ``k``-NN manifolds."""
    real = _as_features(real, "real")
    generated = _as_features(generated, "generated")
    precision = manifold_coverage(generated, real, knn_radii(real, k, batch_size), batch_size)
    recall = manifold_coverage(real, generated, knn_radii(generated, k, batch_size), batch_size)
    return PrecisionRecall(precision=precision, recall=recall, k=k)


@dataclass(frozen=True)
class ImageMetrics:
    """Sample-quality numbers computed with the features of ``extractor`` (e.g. ``lenet-mnist``);
    they are comparable only with numbers computed with the same extractor."""

    extractor: str
    frechet_distance: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    num_samples: int
    num_reference: int


def image_metrics(
    samples: Tensor,
    reference: Tensor,
    extractor: LeNet | InceptionV3,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    k: int = 3,
    generator: torch.Generator | None = None,
) -> ImageMetrics:
    """Frechet distance, KID and precision/recall of ``samples`` against ``reference`` images
    ``[N, C, H, W]`` (float in ``[-1, 1]`` or uint8 pixels), in the features of ``extractor``: a
    shipped classifier or, from the user's local weights file, pytorch-fid's Inception-v3.
    """
    if isinstance(extractor, InceptionV3):
        generated = inception_features(extractor, samples)
        real = inception_features(extractor, reference)
    else:
        generated = extract_features(extractor, samples)
        real = extract_features(extractor, reference)
    kid = kernel_inception_distance(generated, real, kid_subset_size, kid_subsets, generator)
    quality = precision_recall(real, generated, k)
    return ImageMetrics(
        extractor=extractor.name,
        frechet_distance=frechet_distance(generated, real),
        kid=kid.mean,
        kid_std=kid.std,
        precision=quality.precision,
        recall=quality.recall,
        num_samples=generated.shape[0],
        num_reference=real.shape[0],
    )
