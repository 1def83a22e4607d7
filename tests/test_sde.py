"""Stochastic samplers against the closed-form oracles: exact marginals within Monte-Carlo error.

A marginal check compares the sample mean and covariance at grid times with the exact
``N(alpha_t m, sigma_t^2 I + alpha_t^2 C)`` in units of their standard errors: ``sqrt(S_ii / n)``
for a mean and ``sqrt((S_ii S_jj + S_ij^2) / n)`` for a covariance entry (Gaussian samples).
"""

import math

import pytest
import torch

import flowmatch.solvers.sde as sde
from flowmatch.oracles import GaussianMixtureOracle, GaussianOracle
from flowmatch.paths import CondOTSchedule, CosineSchedule, VESchedule, VPSchedule, convert
from flowmatch.solvers import ConstantDiffusion, VanishingDiffusion, integrate, uniform_time_grid

F64 = torch.float64
MEAN = torch.tensor([1.0, -2.0], dtype=F64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)


def _exact_draw(oracle, t: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of the exact marginal ``p_t``: ``alpha_t x1 + sigma_t z``."""
    tt = torch.tensor(t, dtype=F64)
    x1 = oracle.sample(n, generator, dtype=F64)
    z = torch.randn(n, oracle.dim, generator=generator, dtype=F64)
    return oracle.schedule.alpha(tt) * x1 + oracle.schedule.sigma(tt) * z


def _max_z(states: torch.Tensor, times: torch.Tensor, schedule) -> float:
    """Largest |z-score| of the mean and covariance entries of ``states [K, n, 2]`` against the
    exact marginals at ``times [K]``."""
    n = states.shape[1]
    rows, cols = torch.triu_indices(2, 2)
    z = []
    for x, t in zip(states, times, strict=True):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        cov = sigma**2 * torch.eye(2, dtype=F64) + alpha**2 * COV
        var = cov.diagonal()
        z.append((x.mean(0) - alpha * MEAN) / (var / n).sqrt())
        cov_se = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
        z.append(((torch.cov(x.T) - cov) / cov_se)[rows, cols])
    return torch.cat(z).abs().max().item()


# Euler-Maruyama's weak error is O(h). For these cases at 400 steps, the exact moments of the
# scheme (propagated through its affine recursion for the oracle's affine drift) are off by at
# most 0.35 standard errors at n = 10000. Measured max |z| over 4 times x 5 statistics: 1.51
# (CondOT constant), 1.66 (CondOT vanishing), 1.32 (cosine), 1.71 (VP). With the score term's
# sign flipped the variance grows by about int eps dt instead: max |z| 534, 1260, 129, 236.
SDE_CASES = [
    (CondOTSchedule(), ConstantDiffusion(1.0)),
    (CondOTSchedule(), VanishingDiffusion(2.0)),
    (CosineSchedule(), VanishingDiffusion(1.0)),
    (VPSchedule(), ConstantDiffusion(1.0)),
]


@pytest.mark.parametrize(("schedule", "diffusion"), SDE_CASES)
def test_euler_maruyama_has_the_exact_gaussian_marginals(float64, monkeypatch, schedule, diffusion):
    oracle = GaussianOracle(MEAN, COV, schedule)
    steps, n = 400, 10000
    checked = [100, 200, 300, 400]

    def max_z() -> float:
        g = torch.Generator().manual_seed(0)
        x0 = _exact_draw(oracle, 0.0, n, g)
        res = integrate(
            oracle.velocity,
            x0,
            "euler_maruyama",
            steps=steps,
            schedule=schedule,
            diffusion=diffusion,
            generator=g,
            return_trajectory=True,
        )
        return _max_z(res.trajectory[checked], res.time_grid[checked], schedule)

    assert max_z() < 5.0
    monkeypatch.setattr(sde, "convert", lambda *args: -convert(*args))
    assert max_z() > 50.0


def _mixture(schedule) -> GaussianMixtureOracle:
    """Three full-covariance components in 3-D."""
    g = torch.Generator().manual_seed(7)
    means = 2.0 * torch.randn(3, 3, generator=g, dtype=F64)
    a = torch.randn(3, 3, 3, generator=g, dtype=F64)
    covs = a @ a.transpose(-1, -2) / 3 + 0.2 * torch.eye(3, dtype=F64)
    return GaussianMixtureOracle(torch.tensor([0.2, 0.5, 0.3], dtype=F64), means, covs, schedule)


# Mean log-density of n = 10000 SDE samples against that of 1e5 exact samples, in units of the
# standard error of the difference (0.0128 nats). The scheme's bias, measured with n = 1e5 against
# 4e5 exact samples: 0.005 to 0.009 nats at 400 steps (Euler's ODE: 0.014 to 0.016). Measured z:
# -0.70 (constant), 0.30 (vanishing); with the score's sign flipped -92 and -90 (the samples
# spread out: mean log-density -31.6 and -15.3 against -4.16).
@pytest.mark.parametrize("diffusion", [ConstantDiffusion(1.0), VanishingDiffusion(1.0)])
def test_euler_maruyama_mixture_log_density(float64, monkeypatch, diffusion):
    schedule = CondOTSchedule()
    oracle = _mixture(schedule)
    n, n_exact = 10000, 100000
    exact = oracle.log_prob(oracle.sample(n_exact, torch.Generator().manual_seed(2)))

    def z_score() -> float:
        g = torch.Generator().manual_seed(1)
        x0 = torch.randn(n, 3, generator=g)
        x1 = integrate(
            oracle.velocity,
            x0,
            "euler_maruyama",
            steps=400,
            schedule=schedule,
            diffusion=diffusion,
            generator=g,
        ).x
        log_p = oracle.log_prob(x1)
        stderr = (log_p.var() / n + exact.var() / n_exact).sqrt()
        return ((log_p.mean() - exact.mean()) / stderr).item()

    assert abs(z_score()) < 5.0
    monkeypatch.setattr(sde, "convert", lambda *args: -convert(*args))
    assert z_score() < -50.0


def test_diffusion_schedules():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(ConstantDiffusion(0.3)(t), torch.full((4,), 0.3))
    assert torch.allclose(VanishingDiffusion(2.0)(t), torch.tensor([0.0, 1.5, 2.0, 0.0]))
    with pytest.raises(ValueError, match=">= 0"):
        VanishingDiffusion(-1.0)


def test_zero_diffusion_and_the_last_step_are_plain_euler():
    def velocity(x, t):
        return -x * t[:, None]

    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    schedule = CondOTSchedule()
    euler = integrate(velocity, x0, "euler", steps=6)
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    zero = integrate(
        velocity, x0, "euler_maruyama", steps=6, schedule=schedule, diffusion=0.0, generator=g
    )
    one_step = integrate(
        velocity, x0, "euler_maruyama", steps=1, schedule=schedule, diffusion=5.0, generator=g
    )
    assert torch.equal(zero.x, euler.x)
    assert torch.equal(one_step.x, integrate(velocity, x0, "euler", steps=1).x)
    assert torch.equal(g.get_state(), state)  # nothing was drawn


def test_euler_maruyama_nfe_trajectory_and_seeding():
    calls = []

    def velocity(x, t):
        calls.append(t)
        return 1.0 - x

    x0 = torch.zeros(5, 1, 3, 3)  # image-shaped states
    kwargs = {"steps": 7, "schedule": CosineSchedule(), "diffusion": 0.5}
    res = integrate(
        velocity,
        x0,
        "euler_maruyama",
        generator=torch.Generator().manual_seed(5),
        return_trajectory=True,
        **kwargs,
    )
    assert res.nfe == 7 == len(calls) and all(t.shape == (5,) for t in calls)
    assert res.trajectory.shape == (8, 5, 1, 3, 3) and torch.equal(res.trajectory[-1], res.x)
    again = integrate(
        velocity, x0, "euler_maruyama", generator=torch.Generator().manual_seed(5), **kwargs
    )
    other = integrate(
        velocity, x0, "euler_maruyama", generator=torch.Generator().manual_seed(6), **kwargs
    )
    assert torch.equal(again.x, res.x) and not torch.allclose(other.x, res.x)


# Exact map + exact re-noising: every grid state is an exact draw of p_t, whatever gamma.
# n = 20000; measured max |z| over 4 grid times x 5 statistics: 1.44 to 1.70 across the cases.
# Without the factor alpha_t / alpha_u of the re-noising: 42 to 1745 (VE has alpha = 1).
GAMMA_CASES = [
    (CondOTSchedule(), 0.0),
    (CondOTSchedule(), 0.5),
    (CondOTSchedule(), 1.0),
    (CondOTSchedule(sigma_min=0.1), 1.0),
    (CosineSchedule(), 0.5),
    (VPSchedule(), 0.8),
    (VESchedule(), 0.3),
]


@pytest.mark.parametrize(("schedule", "gamma"), GAMMA_CASES)
def test_gamma_sampling_keeps_the_exact_marginals(float64, schedule, gamma):
    oracle = GaussianOracle(MEAN, COV, schedule)
    g = torch.Generator().manual_seed(8)
    x0 = _exact_draw(oracle, 0.0, 20000, g)
    res = integrate(
        oracle,
        x0,
        "flow_map",
        steps=4,
        schedule=schedule,
        gamma=gamma,
        generator=g,
        return_trajectory=True,
    )
    assert res.nfe == 4
    assert _max_z(res.trajectory[1:], res.time_grid[1:], schedule) < 5.0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gamma_zero_is_the_deterministic_jumps(dtype):
    oracle = GaussianOracle(MEAN, COV, CosineSchedule())
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(9), dtype=dtype)
    grid = torch.tensor([0.0, 0.1, 0.35, 0.8, 1.0], dtype=dtype)
    plain = integrate(oracle, x0, "flow_map", time_grid=grid, return_trajectory=True)
    g = torch.Generator().manual_seed(10)
    state = g.get_state()
    gamma0 = integrate(
        oracle,
        x0,
        "flow_map",
        time_grid=grid,
        schedule=oracle.schedule,
        gamma=0.0,
        generator=g,
        return_trajectory=True,
    )
    assert torch.equal(gamma0.trajectory, plain.trajectory) and gamma0.nfe == plain.nfe == 4
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("gamma", [0.3, 0.7, 1.0])
def test_gamma_jump_targets_and_noise_follow_the_rule(float64, gamma):
    # With a map that returns 0, each state is the re-noising alone, d_n z: on CondOT
    # (sigma(1) = 0) the jump goes where sigma/alpha = sqrt(1 - gamma^2) sigma_t/alpha_t and
    # d_n = gamma sigma_t (Kim et al. 2023); gamma = 1 always jumps to t = 1 (Song et al. 2023).
    schedule = CondOTSchedule()
    jumps = []

    def zero_map(x, s, t):
        jumps.append((s[0].item(), t[0].item()))
        return torch.zeros_like(x)

    n, steps = 40000, 4
    res = integrate(
        zero_map,
        torch.zeros(n, 1),
        "flow_map",
        steps=steps,
        schedule=schedule,
        gamma=gamma,
        generator=torch.Generator().manual_seed(11),
        return_trajectory=True,
    )
    grid = uniform_time_grid(steps, dtype=F64)
    starts, targets = torch.tensor(jumps, dtype=F64).T
    assert torch.equal(starts, grid[:-1])
    lam = schedule.sigma(grid[1:]) / schedule.alpha(grid[1:])
    lam_u = schedule.sigma(targets) / schedule.alpha(targets)
    assert torch.allclose(lam_u[:-1], math.sqrt(1 - gamma**2) * lam[:-1], atol=1e-12)
    assert targets[-1] == 1.0 and (gamma < 1.0 or bool((targets == 1.0).all()))
    # The sample std of n normal draws has standard error std / sqrt(2 n) = 0.0035 std.
    stds = res.trajectory[1:-1, :, 0].std(1)
    expected = gamma * schedule.sigma(grid[1:-1])
    assert torch.allclose(stds, expected, rtol=5 * 0.0035)
    assert torch.equal(res.x, torch.zeros(n, 1))  # the last step is a plain jump


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "euler_maruyama", "diffusion": 1.0}, "schedule="),
        ({"method": "euler_maruyama", "schedule": CondOTSchedule()}, "diffusion="),
        ({"method": "rk4", "diffusion": 1.0}, "diffusion= is for"),
        ({"method": "euler", "gamma": 0.5}, "gamma= is for"),
        ({"method": "flow_map", "gamma": 0.5}, "schedule="),
        ({"method": "flow_map", "gamma": 1.5, "schedule": CondOTSchedule()}, r"\[0, 1\]"),
        (
            {"method": "euler_maruyama", "schedule": CondOTSchedule(), "diffusion": -1.0},
            ">= 0",
        ),
        (
            {
                "method": "euler_maruyama",
                "schedule": CondOTSchedule(),
                "diffusion": 1.0,
                "time_grid": torch.linspace(1, 0, 5),
            },
            "increase",
        ),
    ],
)
def test_bad_stochastic_arguments_raise(kwargs, message):
    kwargs = {"steps": 4, **kwargs} if "time_grid" not in kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        integrate(lambda x, *t: x, torch.zeros(2, 2), **kwargs)
