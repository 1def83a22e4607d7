"""Sample distances: energy distance and MMD against brute-force formulas and a closed form; W2
against brute force over permutations and its exact behaviour under translation; noise levels."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.special import i0e, i1e

from flowmatch.data import EightGaussians
from flowmatch.metrics import energy_distance, mmd_rbf, sample_metrics, wasserstein2


def gaussian(n: int, seed: int, d: int = 2) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([[np.linalg.norm(u - v) for v in b] for u in a])


def off_diagonal_mean(matrix: np.ndarray) -> float:
    n = matrix.shape[0]
    return (matrix.sum() - np.trace(matrix)) / (n * (n - 1))


def test_energy_distance_equals_brute_force():
    x, y = gaussian(7, 0, d=4), gaussian(9, 1, d=4) + 0.3
    a, b = x.numpy(), y.numpy()
    expected = (
        2 * pairwise(a, b).mean()
        - off_diagonal_mean(pairwise(a, a))
        - off_diagonal_mean(pairwise(b, b))
    )
    # Item shape [2, 2] is flattened to 4 features.
    value = energy_distance(x.reshape(7, 2, 2), y.reshape(9, 2, 2))
    assert value.dtype == torch.float64 and value.dim() == 0
    assert abs(float(value) - expected) < 1e-12
    # Symmetric, and translation invariant.
    assert abs(float(energy_distance(y, x)) - expected) < 1e-12
    assert abs(float(energy_distance(x + 5.0, y + 5.0)) - expected) < 1e-12


def test_mmd_equals_brute_force():
    x, y = gaussian(8, 2, d=3), gaussian(6, 3, d=3) * 1.5
    a, b, h = x.numpy(), y.numpy(), 0.7

    def k(u, v):
        return np.exp(-(pairwise(u, v) ** 2) / (2 * h * h))

    expected = off_diagonal_mean(k(a, a)) + off_diagonal_mean(k(b, b)) - 2 * k(a, b).mean()
    assert abs(float(mmd_rbf(x, y, bandwidth=h)) - expected) < 1e-12


def rice_mean(shift: float, std: float) -> float:
    """``E|Z|`` for ``Z ~ N(c, std^2 I_2)``, ``|c| = shift`` (mean of the Rice distribution)."""
    half = shift**2 / (4 * std**2)
    laguerre = (1 + 2 * half) * i0e(half) + 2 * half * i1e(half)  # L_{1/2}(-shift^2 / 2 std^2)
    return std * math.sqrt(math.pi / 2) * laguerre


def test_energy_distance_null_and_shift_closed_form():
    # X ~ N(0, I), Y ~ N(c, I) in 2-D: X - Y ~ N(-c, 2 I), X - X' ~ N(0, 2 I), so the population
    # value is 2 E|N(c, 2I)| - 2 E|N(0, 2I)| = 0.42982 for |c| = 1.
    n = 1000
    x, y = gaussian(n, 10), gaussian(n, 11)
    shift = torch.tensor([0.6, 0.8], dtype=torch.float64)
    population = 2 * rice_mean(1.0, math.sqrt(2)) - 2 * rice_mean(0.0, math.sqrt(2))
    assert abs(rice_mean(0.0, math.sqrt(2)) - math.sqrt(math.pi)) < 1e-12
    # Spread over 60 repetitions at n = 1000: std 0.0015 under the null and 0.037 at |c| = 1;
    # tolerances are 5 and 4 of those.
    assert abs(float(energy_distance(x, y))) < 5 * 0.0015
    assert abs(float(energy_distance(x, y + shift)) - population) < 4 * 0.037


def test_w2_equals_brute_force_over_permutations():
    x, y = gaussian(6, 4, d=3), gaussian(6, 5, d=3)
    cost = torch.cdist(x, y) ** 2
    best = min(
        sum(float(cost[i, j]) for i, j in enumerate(permutation)) / 6
        for permutation in itertools.permutations(range(6))
    )
    assert abs(float(wasserstein2(x, y)) - math.sqrt(best)) < 1e-12


def test_w2_of_identical_sets_is_zero():
    x = gaussian(300, 6)
    permuted = x[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    # Squared distances come from |a|^2 + |b|^2 - 2 a.b in float64: ~1e-16 relative, so the
    # square root of their mean is below 1e-6.
    assert float(wasserstein2(x, permuted)) < 1e-6


def test_w2_under_translation():
    # For equal-size sets, sum_i |x_i - y_s(i) - c|^2 = sum_i |x_i - y_s(i)|^2
    # - 2 c . sum_i (x_i - y_i) + n |c|^2 for every permutation s, so the optimal s does not
    # change: W2(x, y + c)^2 = W2(x, y)^2 - 2 c . (mean x - mean y) + |c|^2 exactly.
    # By the triangle inequality, |W2(x, y + c) - |c|| <= W2(x, y) (the empirical noise).
    x, y = gaussian(400, 7), gaussian(400, 8)
    c = torch.tensor([1.5, -2.0], dtype=torch.float64)
    noise, shifted = wasserstein2(x, y), wasserstein2(x, y + c)
    expected = noise**2 - 2 * c @ (x.mean(0) - y.mean(0)) + c @ c
    assert abs(float(shifted**2 - expected)) < 1e-10
    assert abs(float(shifted) - float(c.norm())) <= float(noise)
    assert float(noise) > 0
    with pytest.raises(ValueError, match="equal sample sizes"):
        wasserstein2(x, y[:10])


# Spread of each metric between two independent samples of EightGaussians at n = 500, measured
# over 20 repetitions: energy 0.0035, W2 0.046 (mean 0.22: W2 is biased upwards), MMD 0.00085.
SPREAD = {"energy": 0.0035, "w2": 0.046, "mmd": 0.00085}


def test_sample_metrics_noise_levels():
    target = EightGaussians()
    good = target.sample(500, torch.Generator().manual_seed(123))
    bad = good * 1.5  # over 20 repetitions: energy 0.21, W2 0.77, MMD 0.063
    results_good = sample_metrics(good, target.sample, 500, torch.Generator().manual_seed(0))
    results_bad = sample_metrics(bad, target.sample, 500, torch.Generator().manual_seed(0))
    assert set(results_good) == {
        "energy", "energy_noise", "w2", "w2_noise", "mmd", "mmd_noise", "mmd_bandwidth"
    }  # fmt: skip
    for name, spread in SPREAD.items():
        # The same generator gives the same target draws, so the noise levels agree exactly.
        noise = results_good[f"{name}_noise"]
        assert noise == results_bad[f"{name}_noise"]
        # True samples are within the spread of the noise level (4 spreads of a difference of
        # two such values); scaled samples are more than 10 spreads above it.
        assert abs(results_good[name] - noise) < 4 * math.sqrt(2) * spread
        assert results_bad[name] - noise > 10 * spread
    with pytest.raises(ValueError, match="at least n"):
        sample_metrics(good[:10], target.sample, 500)
