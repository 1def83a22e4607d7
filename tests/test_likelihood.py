"""Likelihood by the instantaneous change of variables, against closed-form densities."""

import math

import pytest
import torch

from flowmatch.oracles import GaussianMixtureOracle, GaussianOracle
from flowmatch.paths import CondOTSchedule, VPSchedule
from flowmatch.solvers import bits_per_dim, log_likelihood, uniform_time_grid

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)


def _mixture(schedule=None):
    return GaussianMixtureOracle(
        torch.tensor([0.3, 0.7]),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]]),
        torch.stack([0.25 * torch.eye(2), torch.eye(2)]).double(),
        schedule=schedule or CondOTSchedule(),
    )


def test_exact_likelihood_of_gaussian_oracle(float64):
    oracle = GaussianOracle(MEAN, COV)
    x1 = oracle.sample(64, generator=torch.Generator().manual_seed(0))
    res = log_likelihood(oracle.velocity, x1, atol=1e-10, rtol=1e-10)
    assert (res.log_prob - oracle.log_prob(x1)).abs().max() < 1e-4
    # The source point is the exact backward flow map X_{1,0}(x1).
    back = oracle.flow_map(x1, torch.ones(64), torch.zeros(64))
    assert torch.allclose(res.x0, back, atol=1e-6)
    assert res.nfe > 0 and res.log_prob_stderr is None


def test_exact_likelihood_of_mixture_oracle(float64):
    oracle = _mixture()
    x1 = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-2.0, 0.5]])
    reference = torch.tensor([-4.6875705437, -2.1945520103, -2.1552708279])  # methods.md 7.2
    assert torch.allclose(oracle.log_prob(x1), reference, atol=1e-9)
    res = log_likelihood(oracle.velocity, x1, atol=1e-10, rtol=1e-10)
    assert (res.log_prob - reference).abs().max() < 1e-4


def test_fixed_step_likelihood_converges(float64):
    oracle = _mixture()
    x1 = oracle.sample(16, generator=torch.Generator().manual_seed(1))
    errors = [
        (log_likelihood(oracle.velocity, x1, method="rk4", steps=n).log_prob - oracle.log_prob(x1))
        .abs()
        .max()
        for n in (50, 100)
    ]
    # RK4: halving the step divides the error by about 16; require at least 8.
    assert errors[1] < 1e-5 and errors[0] / errors[1] > 8


def test_vp_likelihood_uses_the_schedule_source(float64):
    schedule = VPSchedule()
    oracle = GaussianOracle(MEAN, COV, schedule=schedule)
    x1 = oracle.sample(16, generator=torch.Generator().manual_seed(2))
    grid = uniform_time_grid(1, schedule.t_max, 0.0)
    res = log_likelihood(
        oracle.velocity, x1, time_grid=grid, atol=1e-10, rtol=1e-10, log_p0=oracle_log_p0(oracle)
    )
    t_end = torch.full((16,), schedule.t_max)
    assert (res.log_prob - oracle.log_prob_t(x1, t_end)).abs().max() < 1e-4


def oracle_log_p0(oracle):
    """The exact law of x at t = 0 (VP's alpha(0) = 0.0066 makes it not quite N(0, I))."""
    return lambda x: oracle.log_prob_t(x, torch.zeros(x.shape[0]))


def test_hutchinson_matches_within_its_standard_error(float64):
    oracle = GaussianOracle(MEAN, COV)
    x1 = oracle.sample(32, generator=torch.Generator().manual_seed(3))
    exact = oracle.log_prob(x1)
    for noise in ("rademacher", "gaussian"):
        res = log_likelihood(
            oracle.velocity,
            x1,
            divergence="hutchinson",
            probes=8,
            noise=noise,
            generator=torch.Generator().manual_seed(4),
            method="rk4",
            steps=64,
        )
        z = (res.log_prob - exact) / res.log_prob_stderr
        assert (res.log_prob_stderr > 0).all()
        assert z.abs().max() < 4.0, noise


def test_rademacher_hutchinson_is_exact_for_diagonal_covariance(float64):
    # A diagonal S gives a diagonal Jacobian, where z^T A z = tr A for every Rademacher z.
    oracle = GaussianOracle(MEAN, torch.diag(torch.tensor([2.0, 0.5])))
    x1 = oracle.sample(16, generator=torch.Generator().manual_seed(5))
    res = log_likelihood(
        oracle.velocity,
        x1,
        divergence="hutchinson",
        probes=3,
        generator=torch.Generator().manual_seed(6),
        atol=1e-10,
        rtol=1e-10,
    )
    assert (res.log_prob - oracle.log_prob(x1)).abs().max() < 1e-4
    assert res.log_prob_stderr.max() < 1e-10


def test_exact_divergence_on_image_shaped_field(float64):
    # v(x, t) = A x per image (16 pixels) with a fixed random A: log p1(x1) = log N(x0) - tr A.
    gen = torch.Generator().manual_seed(7)
    a = 0.3 * torch.randn(16, 16, generator=gen)

    def velocity(x, t):
        return (x.reshape(-1, 16) @ a.T).reshape(x.shape)

    x1 = torch.randn(5, 1, 4, 4, generator=gen)
    res = log_likelihood(velocity, x1, atol=1e-10, rtol=1e-10)
    x0 = (x1.reshape(5, 16) @ torch.linalg.matrix_exp(-a).T).reshape(5, 1, 4, 4)
    expected = -0.5 * x0.reshape(5, -1).pow(2).sum(1) - 8 * math.log(2 * math.pi) - torch.trace(a)
    assert res.x0.shape == x1.shape
    assert (res.log_prob - expected).abs().max() < 1e-6


def test_bits_per_dim_of_uniform_density_is_log2_levels():
    d = 10
    log_prob = torch.tensor([-d * math.log(2.0)])  # uniform on [-1, 1]^d
    assert bits_per_dim(log_prob, d, 256).item() == pytest.approx(8.0)
    assert bits_per_dim(log_prob, d, 17).item() == pytest.approx(math.log2(17))


def test_bad_likelihood_arguments():
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(lambda x, t: x, torch.zeros(2, 2), divergence="trace")
    with pytest.raises(ValueError, match="probes"):
        log_likelihood(lambda x, t: x, torch.zeros(2, 2), divergence="hutchinson", probes=0)
