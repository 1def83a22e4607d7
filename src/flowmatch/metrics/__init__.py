"""Evaluation metrics: distances between sample sets (energy, W2, MMD) with noise levels, and
Frechet distance, KID and precision/recall of images in the features of a shipped classifier."""

from flowmatch.metrics.features import (
    FEATURE_EXTRACTORS,
    load_feature_extractor,
    load_feature_file,
)
from flowmatch.metrics.frechet import (
    frechet_distance,
    image_metrics,
    kernel_inception_distance,
    precision_recall,
)
from flowmatch.metrics.inception import InceptionV3, inception_features, load_inception
from flowmatch.metrics.samples import (
    energy_distance,
    median_bandwidth,
    mmd_rbf,
    sample_metrics,
    wasserstein2,
)

__all__ = [
    "FEATURE_EXTRACTORS",
    "InceptionV3",
    "energy_distance",
    "frechet_distance",
    "image_metrics",
    "inception_features",
    "kernel_inception_distance",
    "load_feature_extractor",
    "load_feature_file",
    "load_inception",
    "median_bandwidth",
    "mmd_rbf",
    "precision_recall",
    "sample_metrics",
    "wasserstein2",
]
