"""2-D toy distributions: the sampling contract, documented moments, exact densities (normalised,
consistent with the samplers, equal to independent formulas) and the shape of each toy."""

import math

import pytest
import torch

from flowmatch.data import (
    TOY_DATASETS,
    Checkerboard,
    ConcentricRings,
    Dataset,
    EightGaussians,
    GaussianMixture2D,
    Spirals,
    TwoMoons,
)

N = 20_000
WITH_DENSITY = ["checkerboard", "eight-gaussians", "rings", "gmm"]


def draw(name: str, n: int = N, seed: int = 0) -> torch.Tensor:
    return TOY_DATASETS[name]().sample(n, torch.Generator().manual_seed(seed))


def test_registry_names_and_protocol():
    names = {"checkerboard", "eight-gaussians", "moons", "rings", "spirals", "gmm"}
    assert set(TOY_DATASETS) == names
    for key, make in TOY_DATASETS.items():
        dataset = make()
        assert dataset.name == key
        assert dataset.shape == (2,)
        assert isinstance(dataset, Dataset)
        assert hasattr(dataset, "log_prob") == (key in WITH_DENSITY)


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_sample_contract(name):
    global_state = torch.get_rng_state()
    x = draw(name, 1000, seed=3)
    assert torch.equal(torch.get_rng_state(), global_state), "drew from the global generator"
    assert x.shape == (1000, 2) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.equal(x, draw(name, 1000, seed=3))
    assert not torch.equal(x, draw(name, 1000, seed=4))


# Exact second moments (E x^2, E y^2) documented in flowmatch.data.toy; all means are 0.
SECOND_MOMENTS = {
    "checkerboard": (4 / 3, 4 / 3),
    "eight-gaussians": (1 + 0.15**2, 1 + 0.15**2),
    "moons": (1 + 0.1**2, (4 / 3) * (9 / 16 - 1 / math.pi) + 0.1**2),
    "rings": (1.875 / 2 + 0.05**2, 1.875 / 2 + 0.05**2),
    "gmm": (1.3475, 0.635),
}


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_moments_match_documented_scale(name):
    x = draw(name).double()
    # 5 standard errors of a mean of N i.i.d. values, estimated from the sample itself.
    mean_error = 5 * x.std(0) / math.sqrt(N)
    assert (x.mean(0).abs() < mean_error).all()
    if name == "spirals":
        squared_norm = (x**2).sum(1)
        expected = 2.0**2 / 2 + 2 * 0.05**2
        assert abs(squared_norm.mean() - expected) < 5 * squared_norm.std() / math.sqrt(N)
    else:
        second = x**2
        expected = torch.tensor(SECOND_MOMENTS[name], dtype=torch.float64)
        assert ((second.mean(0) - expected).abs() < 5 * second.std(0) / math.sqrt(N)).all()


def grid(half_width: float, h: float) -> torch.Tensor:
    """Cell midpoints of a square grid on ``[-half_width, half_width]^2`` with spacing ``h``."""
    axis = torch.arange(-half_width + h / 2, half_width, h, dtype=torch.float64)
    return torch.cartesian_prod(axis, axis)


@pytest.mark.parametrize("name", WITH_DENSITY)
def test_density_normalised_and_consistent_with_sampler(name):
    dataset = TOY_DATASETS[name]()
    h = 0.01
    points = grid(4.0, h)
    log_p = dataset.log_prob(points)
    p = log_p.exp()
    # Midpoint rule on a smooth density with h = 0.01 (<= std / 5 for every toy) is accurate to
    # far below 1e-4; the checkerboard's edges fall on cell boundaries, so its sum is exact.
    assert abs(p.sum() * h * h - 1.0) < 1e-4
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum() * h * h
    # Cross-entropy of the sampler's draws under log_prob equals the entropy only if they agree
    # (Gibbs); tolerance 5 Monte-Carlo standard errors.
    log_p_samples = dataset.log_prob(draw(name).double())
    assert torch.isfinite(log_p_samples).all()
    cross_entropy = -log_p_samples.mean()
    assert abs(cross_entropy - entropy) < 5 * log_p_samples.std() / math.sqrt(N) + 1e-4


def test_gmm_log_prob_reference_values():
    # methods.md 7.2: pi = (0.3, 0.7), mu = (-2, 0), (2, 1), c = (0.5, 1.0), isotropic.
    covs = torch.stack([0.5**2 * torch.eye(2), 1.0**2 * torch.eye(2)]).double()
    gmm = GaussianMixture2D((0.3, 0.7), ((-2.0, 0.0), (2.0, 1.0)), covs)
    x = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    expected = torch.tensor([-4.6875705437, -2.1945520103, -2.1552708279], dtype=torch.float64)
    torch.testing.assert_close(gmm.log_prob(x), expected, atol=1e-9, rtol=0)


def test_eight_gaussians_layout():
    dataset = EightGaussians()
    means = dataset.oracle.means
    torch.testing.assert_close(
        means.norm(dim=1), torch.full((8,), math.sqrt(2), dtype=torch.float64)
    )
    # Neighbours are pi/4 apart on the circle.
    angles = torch.atan2(means[:, 1], means[:, 0]).remainder(2 * math.pi)
    torch.testing.assert_close(angles.diff(), torch.full((7,), math.pi / 4, dtype=torch.float64))


def test_checkerboard_squares():
    board = Checkerboard()
    centres = torch.cartesian_prod(torch.arange(-2, 2), torch.arange(-2, 2)).double() + 0.5
    black = (centres.floor().sum(1) % 2) == 0
    log_p = board.log_prob(centres)
    assert torch.equal(log_p[black], torch.full((8,), -math.log(8), dtype=torch.float64))
    assert torch.isinf(log_p[~black]).all()
    outside = torch.tensor([[2.5, 0.5], [-2.5, 0.5], [0.5, 2.5], [0.5, -2.5]], dtype=torch.float64)
    assert torch.isinf(board.log_prob(outside)).all()
    # Each black square receives 1/8 of the draws: binomial counts within 5 standard deviations.
    x = draw("checkerboard")
    squares = (x.floor() + 2).long()
    counts = torch.bincount(squares[:, 0] * 4 + squares[:, 1], minlength=16).double()
    index = (centres.floor() + 2).long()
    black_counts = counts[index[black, 0] * 4 + index[black, 1]]
    assert black_counts.sum() == N
    assert ((black_counts - N / 8).abs() < 5 * math.sqrt(N / 8 * 7 / 8)).all()


def test_rings_density_matches_angular_integral():
    # p(x) = (1/K) sum_k (1/2pi) int N(x; r_k (cos phi, sin phi), s^2 I) dphi, by the trapezoid
    # rule on a periodic integrand (spectrally accurate with 4000 nodes).
    rings = ConcentricRings(radii=(0.5, 1.3), noise=0.2)
    x = torch.tensor([[0.0, 0.0], [0.4, 0.3], [1.0, -0.9], [0.0, 2.5]], dtype=torch.float64)
    phi = torch.linspace(0, 2 * math.pi, 4001, dtype=torch.float64)[:-1]
    circle = torch.stack([phi.cos(), phi.sin()], 1)
    density = torch.zeros(4, dtype=torch.float64)
    for radius in rings.radii:
        squared = ((x[:, None, :] - radius * circle[None]) ** 2).sum(-1)
        gauss = torch.exp(-squared / (2 * 0.2**2)) / (2 * math.pi * 0.2**2)
        density += gauss.mean(1) / len(rings.radii)
    torch.testing.assert_close(rings.log_prob(x), density.log(), atol=1e-10, rtol=0)


def test_noise_free_shapes():
    g = torch.Generator().manual_seed(0)
    # Rings: every point on one of the circles.
    x = ConcentricRings(noise=0.0).sample(2000, g).double()
    distance_to_ring = (x.norm(dim=1, keepdim=True) - torch.tensor([0.5, 1.0, 1.5, 2.0])).abs()
    assert distance_to_ring.min(1).values.max() < 1e-6
    # Moons: undo centring and scaling, then each point lies on its half circle.
    unscaled = TwoMoons(noise=0.0).sample(2000, g).double() * (math.sqrt(3) / 2)
    p = unscaled + torch.tensor([0.5, 0.25])
    on_upper = ((p.norm(dim=1) - 1).abs() < 1e-6) & (p[:, 1] >= -1e-6)
    on_lower = (((p - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() < 1e-6) & (p[:, 1] <= 0.5)
    assert (on_upper | on_lower).all() and on_upper.any() and on_lower.any()
    # Spirals: the angle is 2 pi turns |x| / max_radius, on one arm or its mirror image.
    spirals = Spirals(noise=0.0)
    x = spirals.sample(2000, g).double()
    s = x.norm(dim=1) / spirals.max_radius
    angle = 2 * math.pi * spirals.turns * s
    arm = spirals.max_radius * s[:, None] * torch.stack([-angle.cos(), angle.sin()], 1)
    on_arm = ((x - arm).norm(dim=1) < 1e-5) | ((x + arm).norm(dim=1) < 1e-5)
    assert on_arm.all()
