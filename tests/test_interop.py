"""Networks called as other libraries call them: time by keyword, a scalar time for the batch;
a flow map handed to an ODE method refuses in one line; items of several axes in a flow map."""

import pytest
import torch

from flowmatch.nets import MLP, FlatItems, FlowMapNet, UNet
from flowmatch.solvers import sample


@pytest.mark.parametrize(
    "net, x",
    [
        (MLP(3, hidden=16, depth=2), torch.randn(5, 3)),
        (
            UNet(
                1,
                model_channels=8,
                channel_mult=(1, 2),
                attention_resolutions=(),
                num_groups=4,
                image_size=8,
            ),
            torch.randn(5, 1, 8, 8),
        ),
    ],
    ids=["mlp", "unet"],
)
def test_time_by_keyword_and_as_a_scalar(net, x):
    torch.manual_seed(0)
    with torch.no_grad():  # the U-Net's output layer starts at zero
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.2)
    t = torch.full((5,), 0.3)
    expected = net(x, t)
    assert torch.equal(net(x=x, t=t), expected)
    assert torch.allclose(net(x=x, t=torch.tensor(0.3)), expected)
    assert torch.allclose(net(x, t=0.3), expected)
    assert not torch.allclose(net(x, t=0.7), expected)  # the time is used
    with pytest.raises(ValueError, match="expected 1 time input"):
        net(x, t, t=t)


def test_a_flow_map_given_to_an_ode_method_refuses_in_one_line():
    net = FlowMapNet(MLP(2, hidden=8, depth=1, num_times=2))
    with pytest.raises(TypeError, match=r"net\.velocity") as error:
        sample(net, torch.randn(4, 2), method="rk4", steps=4)
    assert len(str(error.value).splitlines()) == 1
    x = sample(net.velocity, torch.randn(4, 2), method="rk4", steps=4)
    assert x.shape == (4, 2)


def test_a_flow_map_over_items_of_several_axes():
    net = FlowMapNet(FlatItems(MLP(20, hidden=8, depth=1, num_times=2), (4, 5)))
    x, s, t = torch.randn(3, 4, 5), torch.zeros(3), torch.ones(3)
    assert net(x, s, t).shape == (3, 4, 5)
    assert torch.equal(net(x, s, s), x)  # the identity at s = t


def test_integrate_and_sample_agree_on_grad_mode():
    from flowmatch.nets import MLP
    from flowmatch.solvers import integrate, sample

    net = MLP(2, hidden=8, depth=1)  # parameters require grad
    x0 = torch.randn(4, 2)
    assert not integrate(net, x0, "euler", steps=2).x.requires_grad
    assert not sample(net, x0, "euler", steps=2).requires_grad
    tracked = x0.clone().requires_grad_(True)  # the caller asks for gradients
    outputs = (integrate(net, tracked, "euler", steps=2).x, sample(net, tracked, "euler", steps=2))
    for out in outputs:
        assert out.requires_grad
        (grad,) = torch.autograd.grad(out.sum(), tracked)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
