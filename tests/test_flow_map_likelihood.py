"""Few-step flow-map likelihood: exact oracle density and Jacobians checked independently."""

import itertools

import pytest
import torch

from flowmatch.flow_map_likelihood import flow_map_log_likelihood
from flowmatch.nets import MLP, FlowMapNet
from flowmatch.oracles import GaussianOracle
from flowmatch.paths import CondOTSchedule, CosineSchedule
from flowmatch.paths.schedules import isotropic_normal_log_prob

MEAN = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize("schedule", [CondOTSchedule(), CosineSchedule()], ids=["condot", "cos"])
@pytest.mark.parametrize("steps", [1, 3])
def test_exact_flow_map_gives_the_exact_density(float64, schedule, steps):
    oracle = GaussianOracle(MEAN, COV, schedule)
    x = torch.cat(
        [torch.tensor([[0.5, -1.0]]), oracle.sample(15, torch.Generator().manual_seed(0))]
    )
    result = flow_map_log_likelihood(oracle, x, steps=steps)
    # Change of variables through the exact map is exact: only round-off remains.
    assert torch.allclose(result.log_prob, oracle.log_prob(x), atol=1e-12)
    assert result.log_prob[0] == pytest.approx(-2.9033992461, abs=1e-9)  # methods.md 7.1
    n = x.shape[0]
    assert torch.allclose(result.x0, oracle.flow_map(x, torch.ones(n), torch.zeros(n)))
    assert result.nfe == steps


class TanhMap:
    """``X_{s,t}(x) = x + (t - s) c tanh(A x)``, invertible for small ``|t - s|``; its step
    Jacobian ``I + (t - s) c diag(sech^2(A x)) A`` is known in closed form."""

    def __init__(self):
        self.a = torch.tensor([[1.0, 0.7, 0.0], [-0.3, 1.2, 0.4], [0.2, 0.0, 0.9]])
        self.c = 0.4

    def __call__(self, x, s, t):
        return x + (t - s)[:, None] * self.c * torch.tanh(x @ self.a.T)

    def step_jacobian(self, x, s, t):
        sech2 = 1.0 - torch.tanh(x @ self.a.T) ** 2
        jac = (t - s)[:, None, None] * self.c * sech2[:, :, None] * self.a
        return torch.eye(3) + jac


def test_composed_jacobian_matches_the_closed_form(float64):
    flow_map = TanhMap()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor([1.0, 0.7, 0.2, 0.0])
    result = flow_map_log_likelihood(flow_map, x, time_grid=grid)
    log_det, y = torch.zeros(8), x
    for s, t in itertools.pairwise(grid):
        s_, t_ = s.expand(8), t.expand(8)
        log_det = log_det + torch.linalg.det(flow_map.step_jacobian(y, s_, t_)).abs().log()
        y = flow_map(y, s_, t_)
    assert torch.allclose(result.x0, y, atol=1e-14)
    assert torch.allclose(result.log_prob, isotropic_normal_log_prob(y) + log_det, atol=1e-12)
    assert log_det.abs().min() > 1e-2  # the Jacobian term matters in this test
    # A source density passed in is used.
    shifted = flow_map_log_likelihood(flow_map, x, time_grid=grid, log_p0=lambda z: 0 * z[:, 0])
    assert torch.allclose(shifted.log_prob, log_det, atol=1e-12)


def test_labels_and_batching_match_per_sample_jacobians(float64):
    torch.manual_seed(0)
    net = FlowMapNet(MLP(2, hidden=16, depth=2, num_times=2, time_scale=10.0, num_classes=3))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    result = flow_map_log_likelihood(net, x, steps=2, model_kwargs={"y": y}, chunk_size=4)
    for i in range(6):

        def backward(xi, i=i):
            half, one, zero = (torch.full((1,), v) for v in (0.5, 1.0, 0.0))
            mid = net(xi[None], one, half, y=y[i : i + 1])
            return net(mid, half, zero, y=y[i : i + 1])[0]

        jac = torch.autograd.functional.jacobian(backward, x[i])
        expected = isotropic_normal_log_prob(backward(x[i])[None]) + torch.slogdet(jac)[1]
        assert torch.allclose(result.log_prob[i], expected[0], atol=1e-12)
