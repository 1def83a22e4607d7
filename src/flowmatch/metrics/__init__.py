"""Evaluation metrics: distances between sample sets (energy, W2, MMD) with noise levels."""

from flowmatch.metrics.samples import (
    energy_distance,
    median_bandwidth,
    mmd_rbf,
    sample_metrics,
    wasserstein2,
)

__all__ = [
    "energy_distance",
    "median_bandwidth",
    "mmd_rbf",
    "sample_metrics",
    "wasserstein2",
]
