"""Conditional flow-matching loss: its minimum at the exact velocity, shapes, couplings, errors."""

import math

import pytest
import torch

from flowmatch.couplings import ExactOTCoupling
from flowmatch.losses import FlowMatchingObjective, cfm_loss
from flowmatch.oracles import GaussianOracle
from flowmatch.paths import AffinePath, CondOTSchedule, VESchedule, VPSchedule

F64 = torch.float64
MEAN = torch.tensor([1.0, -2.0], dtype=F64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
# methods.md 7.1: (pi/2) tr S^{1/2}, summed over the 2 dims; the loss averages over them.
MIN_LOSS_PER_DIM = 3.7323361313 / 2
PATH = AffinePath(CondOTSchedule())


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def test_loss_at_oracle_velocity_is_the_minimum_cfm_value():
    n = 200_000
    oracle = GaussianOracle(MEAN, COV)
    g = torch.Generator().manual_seed(0)
    x1 = oracle.sample(n, g, dtype=F64)
    loss = cfm_loss(oracle.velocity, x1, PATH, generator=g)
    assert loss.shape == (n,) and loss.dtype == F64
    mean, stderr = _mean_and_stderr(loss)
    # Monte-Carlo bound: 5 standard errors (stderr ~ 0.0045, 0.25% of the value).
    assert abs(mean - MIN_LOSS_PER_DIM) < 5 * stderr
    assert stderr < 0.01 * MIN_LOSS_PER_DIM


def test_perturbed_velocities_have_larger_loss():
    # Same draws for every model. A constant shift c adds exactly |c|^2 / d plus 2 c.E[residual]/d,
    # and E[residual] = 0 at the exact field, so the increase is |c|^2 / d within MC error.
    n = 50_000
    oracle = GaussianOracle(MEAN, COV)
    g = torch.Generator().manual_seed(1)
    x1 = oracle.sample(n, g, dtype=F64)
    x0, t = torch.randn(n, 2, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)
    exact = cfm_loss(oracle.velocity, x1, PATH, x0=x0, t=t)
    shift = torch.tensor([0.3, -0.2], dtype=F64)
    shifted = cfm_loss(lambda x, tt: oracle.velocity(x, tt) + shift, x1, PATH, x0=x0, t=t)
    mean, stderr = _mean_and_stderr(shifted - exact)
    assert abs(mean - shift.square().sum() / 2) < 5 * stderr
    for scale in (0.9, 1.1):
        scaled = cfm_loss(lambda x, tt, s=scale: s * oracle.velocity(x, tt), x1, PATH, x0=x0, t=t)
        assert scaled.mean() > exact.mean()


def test_image_batches_average_over_non_batch_dims():
    g = torch.Generator().manual_seed(2)
    x1, x0 = torch.randn(2, 8, 1, 4, 4, generator=g)
    t = torch.rand(8, generator=g)
    loss = cfm_loss(lambda x, tt: torch.zeros_like(x), x1, PATH, x0=x0, t=t)
    assert loss.shape == (8,)
    # CondOT sigma_min = 0: the target is x1 - x0 whatever t is.
    assert torch.allclose(loss, (x1 - x0).square().mean(dim=(1, 2, 3)))
    # Default draws on the inputs' dtype; the same seed gives the same loss.
    a = cfm_loss(lambda x, tt: x, x1, PATH, generator=torch.Generator().manual_seed(3))
    b = cfm_loss(lambda x, tt: x, x1, PATH, generator=torch.Generator().manual_seed(3))
    assert a.shape == (8,) and a.dtype == torch.float32 and torch.equal(a, b)


class _Recorder:
    """A model that records what it was called with and predicts zero."""

    def __call__(self, x, t, **kwargs):
        self.x, self.t, self.kwargs = x, t, kwargs
        return torch.zeros_like(x)


def test_coupling_reorders_x0_only_and_labels_stay_aligned():
    # At t = 1 on CondOT with sigma_min = 0, x_t = x1: the model must see x1 in its own order
    # together with its labels, while the coupled x0 enters the target x1 - x0.
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(16, 1, 2, 2, generator=g)
    y = torch.arange(16)
    x0 = torch.randn(16, 1, 2, 2, generator=g)
    model, ones = _Recorder(), torch.ones(16)
    loss = cfm_loss(
        model, x1, PATH, coupling=ExactOTCoupling(), x0=x0, t=ones, model_kwargs={"y": y}
    )
    assert torch.equal(model.x, x1) and model.kwargs["y"] is y
    paired = ExactOTCoupling()(x0, x1)
    assert not torch.equal(paired, x0)  # the coupling did move something
    assert torch.allclose(loss, (x1 - paired).square().mean(dim=(1, 2, 3)))

    objective = FlowMatchingObjective(PATH, coupling=ExactOTCoupling())
    batch = {"x1": x1, "y": y}
    out = objective(model, batch, step=0, generator=torch.Generator().manual_seed(5))
    assert out.shape == (16,)
    assert model.kwargs["y"] is y and batch["x1"] is x1
    objective(model, {"x1": x1}, 1, None)
    assert model.kwargs == {}


def test_default_time_and_noise_draws():
    # t defaults to U[t_min, t_max] of the schedule (VP stops at 1 - 1e-5); x0 to N(0, I), the
    # noise that sigma(t) scales, also for VE whose source N(0, sigma_max^2 I) is sigma(0) x0.
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(4096, 2, generator=g, dtype=F64)
    model = _Recorder()
    vp = VPSchedule()
    cfm_loss(model, x1, AffinePath(vp), generator=g)
    assert model.t.dtype == F64 and float(model.t.max()) <= vp.t_max
    assert float(model.t.min()) >= vp.t_min
    ve = VESchedule()
    cfm_loss(model, x1, AffinePath(ve), generator=g)
    tb = model.t[:, None]
    x0 = (model.x - ve.alpha(tb) * x1) / ve.sigma(tb)
    assert abs(float(x0.std()) - 1.0) < 0.05  # 4096 x 2 draws: stderr of the std ~ 0.008


def test_objective_state_is_empty():
    objective = FlowMatchingObjective(PATH)
    assert objective.state_dict() == {}
    objective.load_state_dict({})
    with pytest.raises(ValueError):
        objective.load_state_dict({"step": torch.tensor(1)})


def test_wrong_shapes_raise():
    x1 = torch.randn(4, 3)
    with pytest.raises(ValueError):
        cfm_loss(lambda x, t: x[:, :2], x1, PATH)
    with pytest.raises(ValueError):
        cfm_loss(lambda x, t: x, x1, PATH, t=torch.rand(3))
    with pytest.raises(ValueError):
        cfm_loss(lambda x, t: x, x1, PATH, x0=torch.randn(4, 2))
    with pytest.raises(ValueError):
        cfm_loss(lambda x, t: x, torch.randn(4), PATH)
