"""Schedules and affine paths: derivatives against autograd, conditional velocity, conversions."""

import itertools

import pytest
import torch
from torch.func import jvp

from flowmatch.oracles import GaussianMixtureOracle
from flowmatch.paths import (
    AffinePath,
    CondOTSchedule,
    CosineSchedule,
    VESchedule,
    VPSchedule,
    convert,
)

F64 = torch.float64
SCHEDULES = {
    "condot": CondOTSchedule(),
    "condot-smin": CondOTSchedule(sigma_min=1e-3),
    "cosine": CosineSchedule(),
    "vp": VPSchedule(),
    "ve": VESchedule(),
}
PREDICTIONS = ["velocity", "x1", "x0", "score"]


def _grid(schedule, n: int = 101) -> torch.Tensor:
    """Times covering ``[t_min, t_max]`` including both ends (VP stops at 1 - 1e-5)."""
    return torch.linspace(schedule.t_min, schedule.t_max, n, dtype=F64)


@pytest.mark.parametrize("name", SCHEDULES)
def test_derivatives_match_autograd(name):
    schedule = SCHEDULES[name]
    t = _grid(schedule).requires_grad_(True)
    for value, derivative in [
        (schedule.alpha, schedule.d_alpha),
        (schedule.sigma, schedule.d_sigma),
    ]:
        # "+ 0 t" keeps a graph for constants (VE's alpha = 1).
        (auto,) = torch.autograd.grad((value(t) + 0 * t).sum(), t)
        # float64; VP's d_sigma reaches ~50 at t_max (sigma ~ 1e-3), VE's ~4e2 at t = 0.
        assert torch.allclose(derivative(t.detach()), auto, rtol=1e-10, atol=1e-12)


def test_vp_alpha_at_source_end():
    # alpha(0) = exp(-T(1)/2), T(1) = 0.1 + 19.9 / 2 = 10.05 (Lipman et al. 2022, VP defaults).
    alpha0 = VPSchedule().alpha(torch.zeros(1, dtype=F64))
    assert round(float(alpha0), 3) == 0.007  # 0.00657
    assert abs(float(alpha0) - 0.0066) < 5e-5


@pytest.mark.parametrize("name", SCHEDULES)
def test_sample_velocity_is_time_derivative(name):
    schedule = SCHEDULES[name]
    path = AffinePath(schedule)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 8, 3, generator=g, dtype=F64)
    t = _grid(schedule, 8)
    sample = path.sample(x0, x1, t)
    x_t, d_dt = jvp(lambda tt: path.sample(x0, x1, tt).x_t, (t,), (torch.ones_like(t),))
    assert torch.equal(x_t, sample.x_t)
    assert torch.allclose(sample.velocity, d_dt, rtol=1e-12, atol=1e-12)
    assert sample.x0 is x0 and sample.x1 is x1 and sample.t is t


@pytest.mark.parametrize("name", SCHEDULES)
def test_convert_round_trips(name):
    # Away from the ends where alpha = 0 (x1 undetermined) or sigma = 0 (x0 undetermined).
    schedule = SCHEDULES[name]
    g = torch.Generator().manual_seed(1)
    t = (
        schedule.t_min
        + 0.05
        + 0.9 * (schedule.t_max - schedule.t_min) * torch.rand(16, generator=g, dtype=F64)
    )
    x_t, prediction = torch.randn(2, 16, 2, 3, generator=g, dtype=F64)
    for src, dst in itertools.permutations(PREDICTIONS, 2):
        there = convert(schedule, prediction, x_t, t, src, dst)
        back = convert(schedule, there, x_t, t, dst, src)
        assert torch.allclose(back, prediction, rtol=1e-9, atol=1e-9), (src, dst)
    for kind in PREDICTIONS:
        assert torch.allclose(convert(schedule, prediction, x_t, t, kind, kind), prediction)


@pytest.mark.parametrize("name", SCHEDULES)
def test_convert_oracle_velocity_to_score(name):
    # For the marginal path, velocity and score are both linear in (E[x1|x_t], E[x0|x_t]); the
    # conversion of the exact velocity must give the exact score (Tweedie: E[x0|x_t] = -sigma s).
    schedule = SCHEDULES[name]
    oracle = GaussianMixtureOracle(
        torch.tensor([0.4, 0.6], dtype=F64),
        torch.tensor([[-1.0, 0.5], [1.5, -1.0]], dtype=F64),
        torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[1.0, -0.3], [-0.3, 0.6]]], dtype=F64),
        schedule,
    )
    g = torch.Generator().manual_seed(2)
    t = (
        schedule.t_min
        + 0.05
        + 0.9 * (schedule.t_max - schedule.t_min) * torch.rand(16, generator=g, dtype=F64)
    )
    x = 2.0 * torch.randn(16, 2, generator=g, dtype=F64)
    path = AffinePath(schedule)
    score = path.convert(oracle.velocity(x, t), x, t, "velocity", "score")
    assert torch.allclose(score, oracle.score(x, t), rtol=1e-8, atol=1e-8)
    velocity = path.convert(oracle.score(x, t), x, t, "score", "velocity")
    assert torch.allclose(velocity, oracle.velocity(x, t), rtol=1e-8, atol=1e-8)


def test_bad_shapes_and_names_raise():
    path = AffinePath(CondOTSchedule())
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError):
        path.sample(x, torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError):
        path.sample(x, x, torch.zeros(3))
    with pytest.raises(ValueError):
        path.sample(x, x, torch.zeros(4, 1))
    with pytest.raises(ValueError):
        path.convert(x, x, torch.zeros(5), "velocity", "score")
    with pytest.raises(ValueError):
        path.convert(x, x, torch.zeros(4), "eps", "score")
    with pytest.raises(ValueError):
        path.convert(x, x, torch.zeros(4), "velocity", "noise")
