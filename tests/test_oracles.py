"""Closed-form oracles: reference values, flow-map identities, continuity equation, autograd."""

import math

import pytest
import torch
from torch.distributions import MixtureSameFamily, MultivariateNormal
from torch.func import jvp

from flowmatch.oracles import GaussianMixtureOracle, GaussianOracle
from flowmatch.paths import CondOTSchedule, CosineSchedule, VESchedule, VPSchedule

F64 = torch.float64
MEAN = torch.tensor([1.0, -2.0], dtype=F64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
SCHEDULES = {
    "condot": CondOTSchedule(),
    "condot-smin": CondOTSchedule(sigma_min=1e-3),
    "cosine": CosineSchedule(),
    "vp": VPSchedule(),
    "ve": VESchedule(),
}


def _spd(d: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=generator, dtype=F64)
    return a @ a.T / d + 0.2 * torch.eye(d, dtype=F64)


def _mixture(schedule=None) -> GaussianMixtureOracle:
    """Three full-covariance components in 3-D, so the divergence has off-diagonal structure."""
    g = torch.Generator().manual_seed(7)
    means = 2.0 * torch.randn(3, 3, generator=g, dtype=F64)
    covs = torch.stack([_spd(3, g) for _ in range(3)])
    return GaussianMixtureOracle(torch.tensor([0.2, 0.5, 0.3], dtype=F64), means, covs, schedule)


def _times(schedule, n: int, generator: torch.Generator) -> torch.Tensor:
    """Times covering the schedule's whole valid range, both ends included."""
    inner = torch.rand(n - 2, generator=generator, dtype=F64)
    t = torch.cat([torch.zeros(1, dtype=F64), inner, torch.ones(1, dtype=F64)])
    return schedule.t_min + (schedule.t_max - schedule.t_min) * t


def _full(value: float, n: int = 1) -> torch.Tensor:
    return torch.full((n,), value, dtype=F64)


# Reference values of methods.md 7.1 / 7.2 (linear path, sigma_min = 0), given to 10 decimals:
# compared to 1e-8 so the last printed digits can round either way.
def test_gaussian_reference_values():
    oracle = GaussianOracle(MEAN, COV)
    x = torch.tensor([[1.0, 0.0]], dtype=F64)
    expected = {
        "u": (oracle.velocity(x, _full(0.5)), [1.6521739130, -1.9130434783]),
        "X01": (oracle.flow_map(x, _full(0.0), _full(1.0)), [2.3984702049, -1.7895692843]),
        "X": (oracle.flow_map(x, _full(0.25), _full(0.75)), [1.8036441597, -0.8909852999]),
        "v": (oracle.slope(x, _full(0.25), _full(0.75)), [1.6072883194, -1.7819705997]),
        "div": (oracle.divergence(x, _full(0.5)), [0.5217391304]),
        "logN": (oracle.log_prob(torch.tensor([[0.5, -1.0]], dtype=F64)), [-2.9033992461]),
    }
    for name, (got, want) in expected.items():
        assert torch.allclose(got.flatten(), torch.tensor(want, dtype=F64), atol=1e-8), name
    # One-step map X_{0,1}(x) = m + S^{1/2} x (the Brenier map N(0, I) -> N(m, S)).
    sqrt_s = torch.tensor([[1.3984702049, 0.2104307157], [0.2104307157, 0.9776087734]], dtype=F64)
    xs = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    one_step = oracle.flow_map(xs, _full(0.0, 5), _full(1.0, 5))
    assert torch.allclose(one_step, MEAN + xs @ sqrt_s.T, atol=1e-8)
    # Linear-path endpoints: u_0(x) = m - x, u_1(x) = x.
    assert torch.allclose(oracle.velocity(xs, _full(0.0, 5)), MEAN - xs, atol=1e-12)
    assert torch.allclose(oracle.velocity(xs, _full(1.0, 5)), xs, atol=1e-12)


def test_mixture_reference_values():
    oracle = GaussianMixtureOracle(
        torch.tensor([0.3, 0.7], dtype=F64),
        torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=F64),
        torch.stack([0.25 * torch.eye(2, dtype=F64), torch.eye(2, dtype=F64)]),
    )
    x = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-2.0, 0.5]], dtype=F64)
    half = _full(0.5, 3)
    log_p1 = torch.tensor([-4.6875705437, -2.1945520103, -2.1552708279], dtype=F64)
    u_half = torch.tensor(
        [
            [0.3058983940, 0.6742112296],
            [1.9999979530, 0.9999994075],
            [-0.7962814270, -0.5978751012],
        ],
        dtype=F64,
    )
    assert torch.allclose(oracle.log_prob(x), log_p1, atol=1e-8)
    assert torch.allclose(oracle.velocity(x, half), u_half, atol=1e-8)
    w = torch.tensor([0.3257887704, 0.6742112296], dtype=F64)
    assert torch.allclose(oracle.posterior(x[:1], half[:1])[0], w, atol=1e-8)


@pytest.mark.parametrize("name", SCHEDULES)
def test_log_prob_t_matches_torch_distributions(name):
    # x_t | component k ~ N(alpha mu_k, sigma^2 I + alpha^2 C_k): an independent implementation.
    schedule = SCHEDULES[name]
    oracle = _mixture(schedule)
    g = torch.Generator().manual_seed(1)
    t = _times(schedule, 6, g)
    x = 3.0 * torch.randn(6, 3, generator=g, dtype=F64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    for i in range(6):
        covs = sigma[i] ** 2 * torch.eye(3, dtype=F64) + alpha[i] ** 2 * oracle.covs
        reference = MixtureSameFamily(
            torch.distributions.Categorical(oracle.weights),
            MultivariateNormal(alpha[i] * oracle.means, covs),
        ).log_prob(x[i])
        assert torch.allclose(oracle.log_prob_t(x[i : i + 1], t[i : i + 1])[0], reference)


def test_log_prob_is_the_sigma_min_smoothed_target():
    sigma_min = 0.1
    oracle = GaussianOracle(MEAN, COV, CondOTSchedule(sigma_min=sigma_min))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    smoothed = MultivariateNormal(MEAN, COV + sigma_min**2 * torch.eye(2, dtype=F64))
    assert torch.allclose(oracle.log_prob(x), smoothed.log_prob(x))
    # The source end t = 0 of CondOT is exactly N(0, I).
    source = CondOTSchedule(sigma_min).source_log_prob(x)
    assert torch.allclose(oracle.log_prob_t(x, _full(0.0, 4)), source)


@pytest.mark.parametrize("name", ["condot", "condot-smin", "cosine", "vp", "ve"])
def test_flow_map_lagrangian_residual_is_zero(name):
    # d/dt X_{s,t}(x) = u_t(X_{s,t}(x)) with d/dt by forward-mode AD; float64, so 1e-9 leaves
    # room only for rounding (VE velocities reach ~1e2).
    schedule = SCHEDULES[name]
    oracle = GaussianOracle(MEAN, COV, schedule)
    g = torch.Generator().manual_seed(3)
    s, t = _times(schedule, 8, g), _times(schedule, 8, g).flip(0)
    x = torch.randn(8, 2, generator=g, dtype=F64)
    x_t, d_dt = jvp(lambda tt: oracle.flow_map(x, s, tt), (t,), (torch.ones_like(t),))
    residual = d_dt - oracle.velocity(x_t, t)
    assert residual.abs().max() < 1e-9 * (1 + oracle.velocity(x_t, t).abs().max())


@pytest.mark.parametrize("name", ["condot", "cosine", "vp", "ve"])
def test_flow_map_identity_and_semigroup(name):
    schedule = SCHEDULES[name]
    oracle = GaussianOracle(MEAN, COV, schedule)
    g = torch.Generator().manual_seed(4)
    s, u, t = (_times(schedule, 8, g) for _ in range(3))
    x = 2.0 * torch.randn(8, 2, generator=g, dtype=F64)
    assert torch.allclose(oracle.flow_map(x, s, s), x, atol=1e-12)
    two_steps = oracle.flow_map(oracle.flow_map(x, s, u), u, t)
    assert torch.allclose(two_steps, oracle.flow_map(x, s, t), atol=1e-10)
    assert torch.equal(oracle(x, s, t), oracle.flow_map(x, s, t))


def test_slope_off_and_on_the_diagonal():
    oracle = GaussianOracle(MEAN, COV, CosineSchedule())
    g = torch.Generator().manual_seed(5)
    s = torch.rand(6, generator=g, dtype=F64)
    t = torch.where(torch.arange(6) < 3, s, torch.rand(6, generator=g, dtype=F64))
    x = torch.randn(6, 2, generator=g, dtype=F64).requires_grad_(True)
    t = t.clone().requires_grad_(True)
    v = oracle.slope(x, s, t)
    off = slice(3, 6)
    chord = (oracle.flow_map(x, s, t) - x)[off] / (t - s)[off, None]
    assert torch.allclose(v[off], chord, atol=1e-12)
    assert torch.allclose(v[:3], oracle.velocity(x[:3], s[:3]), atol=1e-14)
    # The limit t -> s of the chord is u_s; 1e-6 away the slope moves by O(1e-6).
    near = oracle.slope(x[:3], s[:3], s[:3] + 1e-6)
    assert torch.allclose(near, v[:3], atol=1e-5)
    # No 0/0 on the diagonal, also in the backward pass.
    grad_x, grad_t = torch.autograd.grad(v.sum(), (x, t))
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_t).all()


def _autograd_divergence(velocity, x, t):
    x = x.clone().requires_grad_(True)
    u = velocity(x, t)
    rows = [torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(3)]
    return torch.stack(rows).sum(0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_mixture_divergence_and_score_match_autograd(name):
    # Each sample depends only on its own x, so summing over the batch keeps per-sample
    # derivatives. Closed forms and autograd agree to rounding (float64).
    schedule = SCHEDULES[name]
    oracle = _mixture(schedule)
    g = torch.Generator().manual_seed(6)
    t = _times(schedule, 10, g)
    x = 2.0 * torch.randn(10, 3, generator=g, dtype=F64)
    reference = _autograd_divergence(oracle.velocity, x, t)
    assert torch.allclose(oracle.divergence(x, t), reference, atol=1e-9, rtol=1e-9)
    xg = x.clone().requires_grad_(True)
    (grad_log_p,) = torch.autograd.grad(oracle.log_prob_t(xg, t).sum(), xg)
    assert torch.allclose(oracle.score(x, t), grad_log_p, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["condot", "condot-smin", "cosine", "vp", "ve"])
def test_mixture_continuity_equation(name):
    # d/dt log p_t + u . grad log p_t + div u = 0: the velocity generates the path's marginals.
    schedule = SCHEDULES[name]
    oracle = _mixture(schedule)
    g = torch.Generator().manual_seed(8)
    t = _times(schedule, 12, g).requires_grad_(True)
    x = (2.0 * torch.randn(12, 3, generator=g, dtype=F64)).requires_grad_(True)
    grad_x, d_dt = torch.autograd.grad(oracle.log_prob_t(x, t).sum(), (x, t))
    u = oracle.velocity(x.detach(), t.detach())
    residual = d_dt + (u * grad_x).sum(-1) + oracle.divergence(x.detach(), t.detach())
    # Terms reach ~1e3 (VE near t = 0, VP near t = 1); residual is rounding only.
    assert residual.abs().max() < 1e-8 * (1 + d_dt.abs().max())


def test_gaussian_divergence_is_half_log_det_rate():
    # div u_t = 1/2 d/dt log det Sigma_t, constant in x.
    schedule = CosineSchedule()
    oracle = GaussianOracle(MEAN, COV, schedule)
    t = torch.tensor([0.2, 0.7], dtype=F64).requires_grad_(True)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    eye = torch.eye(2, dtype=F64)
    log_dets = [torch.logdet(sigma[i] ** 2 * eye + alpha[i] ** 2 * COV) for i in range(2)]
    (d_log_det,) = torch.autograd.grad(sum(log_dets), t)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert torch.allclose(oracle.divergence(x, t.detach()), 0.5 * d_log_det, atol=1e-12)
    assert torch.allclose(oracle.divergence(5 * x, t.detach()), 0.5 * d_log_det, atol=1e-12)


def test_float32_inputs_give_float32_results_close_to_float64():
    oracle = _mixture(CondOTSchedule(sigma_min=1e-3))
    gauss = GaussianOracle(MEAN, COV)
    g = torch.Generator().manual_seed(10)
    x64, t64 = torch.randn(16, 3, generator=g, dtype=F64), torch.rand(16, generator=g, dtype=F64)
    x32, t32 = x64.float(), t64.float()
    for method in (oracle.velocity, oracle.score, oracle.divergence, oracle.log_prob_t):
        out32, out64 = method(x32, t32), method(x64, t64)
        assert out32.dtype == torch.float32
        # float32 rounding of O(1..10) quantities, amplified by Sigma_t^{-1} near t = 1.
        assert torch.allclose(out32.double(), out64, rtol=1e-4, atol=1e-4), method.__name__
    s32 = torch.rand(16, generator=g)
    mapped = gauss.flow_map(x32[:, :2], s32, t32)
    assert mapped.dtype == torch.float32
    assert torch.allclose(mapped.double(), gauss.flow_map(x64[:, :2], s32.double(), t64), atol=1e-5)


def test_sample_moments():
    # Sample mean and covariance within 5 standard errors estimated from the sample itself.
    n = 20000
    oracle = GaussianOracle(MEAN, COV)
    x = oracle.sample(n, torch.Generator().manual_seed(11), dtype=F64)
    assert x.shape == (n, 2) and x.dtype == F64
    assert ((x.mean(0) - MEAN).abs() < 5 * x.std(0) / math.sqrt(n)).all()
    centred = x - MEAN
    products = centred[:, :, None] * centred[:, None, :]
    se = products.std(0) / math.sqrt(n)
    assert ((products.mean(0) - COV).abs() < 5 * se).all()

    mixture = _mixture()
    y = mixture.sample(n, torch.Generator().manual_seed(12), dtype=torch.float32)
    assert y.dtype == torch.float32
    mean = (mixture.weights[:, None] * mixture.means).sum(0)
    assert ((y.double().mean(0) - mean).abs() < 5 * y.double().std(0) / math.sqrt(n)).all()
    again = mixture.sample(n, torch.Generator().manual_seed(12), dtype=torch.float32)
    assert torch.equal(y, again)


def test_bad_inputs_raise():
    oracle = GaussianOracle(MEAN, COV)
    x, t = torch.zeros(4, 2, dtype=F64), torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError):
        oracle.velocity(torch.zeros(4, 3, dtype=F64), t)
    with pytest.raises(ValueError):
        oracle.velocity(torch.zeros(2, dtype=F64), t[:1])
    with pytest.raises(ValueError):
        oracle.velocity(x, torch.zeros(4, 1, dtype=F64))
    with pytest.raises(ValueError):
        oracle.flow_map(x, t, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError):
        GaussianOracle(MEAN, torch.tensor([[1.0, 2.0], [2.0, 1.0]]))  # indefinite
    with pytest.raises(ValueError):
        GaussianOracle(MEAN, torch.eye(3))
    with pytest.raises(ValueError):
        GaussianMixtureOracle(
            torch.tensor([0.5, -0.5]), torch.zeros(2, 2), torch.eye(2).repeat(2, 1, 1)
        )
    with pytest.raises(ValueError):
        GaussianMixtureOracle(torch.ones(2), torch.zeros(2, 2), torch.eye(2).repeat(3, 1, 1))
