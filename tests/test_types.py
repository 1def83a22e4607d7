"""The protocols of flowmatch.types: the library's flow maps and oracles satisfy them."""

import pytest
import torch

from flowmatch.nets import MLP
from flowmatch.nets.flow_map import FlowMapNet
from flowmatch.oracles import GaussianMixtureOracle, GaussianOracle
from flowmatch.types import FlowMap

F64 = torch.float64
MEAN = torch.tensor([1.0, -2.0], dtype=F64)
COV = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)


def test_flow_maps_are_flow_maps():
    assert isinstance(FlowMapNet(MLP(2, hidden=8, depth=2, num_times=2)), FlowMap)
    assert isinstance(GaussianOracle(MEAN, COV), FlowMap)
    assert not isinstance(MLP(2, hidden=8, depth=2), FlowMap)


def test_oracles_refuse_model_kwargs():
    oracle = GaussianOracle(MEAN, COV)
    mixture = GaussianMixtureOracle(torch.ones(1, dtype=F64), MEAN[None], COV[None])
    x, s, t = torch.zeros(3, 2, dtype=F64), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    y = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(oracle(x, s, t, **{}), oracle.flow_map(x, s, t))
    for call in (
        lambda: oracle(x, s, t, y=y),
        lambda: oracle.flow_map(x, s, t, y=y),
        lambda: oracle.slope(x, s, t, y=y),
        lambda: oracle.velocity(x, t, y=y),
        lambda: mixture.velocity(x, t, y=y),
    ):
        with pytest.raises(TypeError, match="no model keyword arguments"):
            call()
