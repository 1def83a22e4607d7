"""Solvers against the closed-form Gaussian oracle: transport, convergence order, NFE, errors."""

import math

import pytest
import torch

from flowmatch.oracles import GaussianOracle
from flowmatch.paths import CondOTSchedule, CosineSchedule, VESchedule, VPSchedule
from flowmatch.solvers import STEP_RULES, integrate, sample, uniform_time_grid

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)


def _oracle(schedule=None):
    return GaussianOracle(MEAN, COV, schedule=schedule or CondOTSchedule())


# (schedule, rk4 steps). Errors relative to the state's scale, measured with this test's draw:
# CondOT 1.4e-9 and cosine 2.2e-9 at 64 steps. VP's velocity changes on a time scale of
# 1/beta_max = 0.05 near t = 0 and VE's decays at rate 2 log(sigma_max / sigma_min) = 17 from a
# source of scale 50, so both get 128 steps: VP 3e-10, VE 1.2e-8 (VE at 64 steps: 2e-7, falling
# as h^4). The 1e-6 bound leaves a margin of 100 or more for every schedule.
TRANSPORT_CASES = [
    (CondOTSchedule(), 64),
    (CondOTSchedule(sigma_min=1e-3), 64),
    (CosineSchedule(), 64),
    (VPSchedule(), 128),
    (VESchedule(), 128),
]


@pytest.mark.parametrize(("schedule", "steps"), TRANSPORT_CASES)
def test_rk4_transports_source_to_exact_flow_map(float64, schedule, steps):
    oracle = _oracle(schedule)
    x0 = schedule.sample_source((256, 2), generator=torch.Generator().manual_seed(0))
    t0, t1 = schedule.t_min, schedule.t_max
    grid = uniform_time_grid(steps, t0, t1)
    x1 = sample(oracle.velocity, x0, "rk4", time_grid=grid)
    exact = oracle.flow_map(x0, torch.full((256,), t0), torch.full((256,), t1))
    scale = max(1.0, x0.abs().max().item())
    assert (x1 - exact).abs().max().item() / scale < 1e-6


def test_transported_samples_have_target_moments(float64):
    oracle = _oracle()
    x0 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    x1 = sample(oracle.velocity, x0, "rk4", steps=32)
    # Standard error of a mean is sqrt(S_ii / n) <= 0.01; of a covariance entry about 0.02.
    assert torch.allclose(x1.mean(0), MEAN, atol=0.05)
    assert torch.allclose(torch.cov(x1.T), COV, atol=0.1)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
def test_measured_convergence_order(float64, method):
    # The cosine path keeps the oracle velocity smooth and time-dependent on all of [0, 1].
    oracle = _oracle(CosineSchedule())
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    exact = oracle.flow_map(x0, torch.zeros(64), torch.ones(64))
    steps = [8, 16, 32, 64]
    errors = [(sample(oracle.velocity, x0, method, steps=n) - exact).abs().max() for n in steps]
    slope = -torch.linalg.lstsq(
        torch.stack([torch.log(torch.tensor(steps, dtype=torch.float64)), torch.ones(4)], 1),
        torch.log(torch.stack(errors))[:, None],
    ).solution[0, 0]
    assert abs(slope.item() - STEP_RULES[method].order) < 0.3, (method, slope, errors)


def test_dopri5_reaches_tolerance_and_counts_nfe(float64):
    oracle = _oracle()
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    exact = oracle.flow_map(x0, torch.zeros(32), torch.ones(32))
    loose = integrate(oracle.velocity, x0, "dopri5", atol=1e-4, rtol=1e-4)
    tight = integrate(oracle.velocity, x0, "dopri5", atol=1e-10, rtol=1e-10)
    assert (tight.x - exact).abs().max() < 1e-8
    assert tight.nfe > loose.nfe > 0


def test_nfe_and_trajectory_of_fixed_step_methods():
    calls = []

    def velocity(x, t):
        calls.append(t)
        return -x

    x0 = torch.ones(3, 2)
    for method, per_step in [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)]:
        calls.clear()
        res = integrate(velocity, x0, method, steps=5, return_trajectory=True)
        assert res.nfe == 5 * per_step == len(calls)
        assert res.trajectory.shape == (6, 3, 2)
        assert torch.equal(res.trajectory[0], x0) and torch.equal(res.trajectory[-1], res.x)
        assert all(t.shape == (3,) for t in calls)


def test_model_kwargs_reach_the_field():
    def velocity(x, t, y):
        return y[:, None].to(x) * torch.ones_like(x)

    x = sample(
        velocity, torch.zeros(2, 3), "euler", steps=4, model_kwargs={"y": torch.tensor([1, 2])}
    )
    assert torch.allclose(x, torch.tensor([[1.0] * 3, [2.0] * 3]))


def test_flow_map_method_runs_the_map_over_the_grid(float64):
    oracle = _oracle()
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    exact = oracle.flow_map(x0, torch.zeros(16), torch.ones(16))
    for steps in (1, 2, 7):  # an exact flow map is exact at any step count
        res = integrate(oracle, x0, "flow_map", steps=steps)
        assert res.nfe == steps
        assert torch.allclose(res.x, exact, atol=1e-12)


def test_image_shaped_states():
    x0 = torch.randn(4, 1, 4, 4)
    x1 = sample(lambda x, t: -t.view(-1, 1, 1, 1) * x, x0, "heun", steps=8)
    assert x1.shape == x0.shape
    # dx/dt = -t x has the solution x0 exp(-1/2); Heun's error at h = 1/8 is below 1e-3.
    assert torch.allclose(x1, x0 * math.exp(-0.5), atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "rk5", "steps": 4}, "unknown solver method"),
        ({"method": "euler", "steps": 4, "time_grid": torch.linspace(0, 1, 5)}, "not both"),
        ({"method": "euler"}, "needs steps"),
        ({"method": "euler", "time_grid": torch.tensor([0.0, 0.5, 1.5])}, r"\[0, 1\]"),
        ({"method": "euler", "time_grid": torch.tensor([0.0, 0.7, 0.5, 1.0])}, "monotone"),
        ({"method": "euler", "steps": 0}, "positive"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(lambda x, t: x, torch.zeros(2, 2), **kwargs)


def test_non_finite_result_raises():
    with pytest.raises(FloatingPointError, match="non-finite"):
        sample(lambda x, t: x / 0.0, torch.zeros(2, 2), "euler", steps=3)
