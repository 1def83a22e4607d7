"""Distances between two sets of samples: energy distance, exact W2, RBF-kernel MMD, and
``sample_metrics``, which reports each with its noise level.

Every function flattens ``[n, *dims]`` to ``[n, d]``, computes in float64 and returns a 0-dim
float64 tensor. A finite-sample distance is not zero between two samples of one distribution;
``sample_metrics`` therefore also reports the same metric between two independent target samples
of the same size, the level below which a gap is not evidence of anything.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Rows of one pairwise-distance block, chosen so that a block holds ~2**23 float64 values (64 MB).
_BLOCK_VALUES = 2**23


def _flat64(x: Tensor, device: torch.device) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).to(device=device, dtype=torch.float64)


def _distance(distance: Tensor) -> Tensor:
    return distance


def _pairwise_sum(a: Tensor, b: Tensor, kernel: Callable[[Tensor], Tensor]) -> Tensor:
    """``sum_{i,j} kernel(|a_i - b_j|)``, over row blocks of ``a`` to bound memory."""
    rows = max(1, _BLOCK_VALUES // b.shape[0])
    total = a.new_zeros(())
    for start in range(0, a.shape[0], rows):
        total = total + kernel(torch.cdist(a[start : start + rows], b)).sum()
    return total


def _u_statistic(a: Tensor, b: Tensor, kernel: Callable[[Tensor], Tensor]) -> Tensor:
    """Unbiased ``E k(A, B)``; for ``b is a`` the mean over pairs ``i != j`` (``E k(A, A')``)."""
    if b is a:
        n = a.shape[0]
        diagonal = kernel(a.new_zeros(())) * n
        return (_pairwise_sum(a, a, kernel) - diagonal) / (n * (n - 1))
    return _pairwise_sum(a, b, kernel) / (a.shape[0] * b.shape[0])


def _check_pair(x: Tensor, y: Tensor, min_rows: int) -> None:
    if x[0].numel() != y[0].numel():
        raise ValueError(
            f"samples must have the same item size, got {list(x.shape)} and {list(y.shape)}"
        )
    if x.shape[0] < min_rows or y.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} samples on each side")


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Squared energy distance ``D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Szekely & Rizzo).

    ``x: [n, *dims]``, ``y: [m, *dims]``. The within-sample terms average over pairs ``i != j``,
    so the estimate is unbiased (a U-statistic): it is ``~0`` and can be slightly negative when
    both samples come from one distribution. ``D^2 >= 0`` at the population level, with equality
    iff the distributions agree. Cost ``O((n + m)^2 d)`` in blocks of bounded memory.
    """
    _check_pair(x, y, min_rows=2)
    x, y = _flat64(x, x.device), _flat64(y, x.device)
    return (
        2 * _u_statistic(x, y, _distance)
        - _u_statistic(x, x, _distance)
        - _u_statistic(y, y, _distance)
    )


def wasserstein2(x: Tensor, y: Tensor) -> Tensor:
    """Exact ``W2`` between two empirical measures of ``n`` points each.

    ``W2 = sqrt(min_sigma (1/n) sum_i |x_i - y_sigma(i)|^2)``, the optimal permutation found by
    ``scipy.optimize.linear_sum_assignment`` on squared distances (``O(n^3)``; about a second at
    ``n = 2000``). Between two samples of one distribution it is biased upwards.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"wasserstein2 needs equal sample sizes, got {x.shape[0]} and {y.shape[0]}"
        )
    _check_pair(x, y, min_rows=1)
    x, y = _flat64(x, x.device), _flat64(y, x.device)
    cost = (torch.cdist(x, y) ** 2).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return torch.tensor(np.sqrt(cost[rows, cols].mean()), dtype=torch.float64, device=x.device)


def median_bandwidth(x: Tensor, max_rows: int = 1000) -> float:
    """Median pairwise distance among the first ``max_rows`` rows of ``x`` (median heuristic)."""
    x = _flat64(x[:max_rows], x.device)
    return float(torch.pdist(x).median())


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> Tensor:
    """Unbiased squared MMD with ``k(a, b) = exp(-|a - b|^2 / (2 h^2))`` (Gretton et al. 2012).

    ``MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y)`` with ``i != j`` within samples. ``h`` is
    ``bandwidth``, or ``median_bandwidth`` of the pooled first rows when ``None``; pass a fixed
    ``h`` to compare several models against one target.
    """
    _check_pair(x, y, min_rows=2)
    x, y = _flat64(x, x.device), _flat64(y, x.device)
    if bandwidth is None:
        bandwidth = median_bandwidth(torch.cat([x[:500], y[:500]]))
    scale = -0.5 / bandwidth**2

    def kernel(distance: Tensor) -> Tensor:
        return torch.exp(scale * distance**2)

    return _u_statistic(x, x, kernel) + _u_statistic(y, y, kernel) - 2 * _u_statistic(x, y, kernel)


def sample_metrics(
    samples: Tensor,
    target_sampler: Callable[[int, torch.Generator | None], Tensor],
    n: int,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Energy distance, W2 and MMD between ``samples[:n]`` and ``n`` target draws, each with its
    noise level: the same metric between two independent target samples of size ``n``.

    ``target_sampler(n, generator)`` draws from the target (e.g. ``dataset.sample``); it is called
    twice. The MMD bandwidth is the median heuristic on the first target sample, shared by both
    comparisons. Keys: ``energy``, ``w2``, ``mmd`` and each with ``_noise``; ``mmd_bandwidth``.
    """
    if samples.shape[0] < n:
        raise ValueError(f"need at least n = {n} samples, got {samples.shape[0]}")
    model = samples[:n]
    target = target_sampler(n, generator)
    reference = target_sampler(n, generator)
    bandwidth = median_bandwidth(target)
    metrics: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "energy": energy_distance,
        "w2": wasserstein2,
        "mmd": lambda a, b: mmd_rbf(a, b, bandwidth),
    }
    results: dict[str, float] = {}
    for name, metric in metrics.items():
        results[name] = float(metric(model, target))
        results[f"{name}_noise"] = float(metric(reference, target))
    results["mmd_bandwidth"] = bandwidth
    return results
