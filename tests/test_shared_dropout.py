"""Dropout in flow-map losses: the calls of one residual share masks and advance the RNG once."""

import functools
import shutil

import pytest
import torch
from torch import nn

from flowmatch.losses import (
    ContinuousConsistencyObjective,
    FusedLSDObjective,
    ImprovedMeanFlowObjective,
    MeanFlowObjective,
    SelfDistillationObjective,
    SharedRandomness,
    TerminalVelocityObjective,
    alpha_flow_loss,
    continuous_consistency_loss,
    directional_derivative,
    esd,
    eulerian_self_distillation_loss,
    improved_meanflow_loss,
    lagrangian_self_distillation_loss,
    lsd,
    meanflow_loss,
    progressive_self_distillation_loss,
    shortcut_loss,
    terminal_velocity_loss,
)
from flowmatch.nets import FlowMapNet, UNet
from flowmatch.paths import AffinePath, CondOTSchedule
from flowmatch.training import TrainConfig, train

PATH = AffinePath(CondOTSchedule())


class DropoutBackbone(nn.Module):
    """``v(x, s, gap)``: two tanh layers, each followed by dropout ``p``, on ``[x, s, gap]``
    (times fed raw, so finite differences are accurate). Records the CPU RNG state at the
    start of every call."""

    num_times = 2

    def __init__(self, dim=2, hidden=32, p=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(dim + 2, hidden),
            nn.Tanh(),
            nn.Dropout(p),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Dropout(p),
            nn.Linear(hidden, dim),
        )
        self.call_states = []

    def forward(self, x, s, gap):
        self.call_states.append(torch.get_rng_state())
        return self.net(torch.cat([x, s[:, None], gap[:, None]], dim=1))


def _net(p=0.5):
    return FlowMapNet(DropoutBackbone(p=p)).train()


def _tiny_unet():
    """A one-level U-Net with dropout 0.5, weights ~ N(0, 0.1^2) (its zero-initialised output
    layers would make every derivative 0), time embedding scale 10."""
    unet = UNet(
        1,
        8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        dropout=0.5,
        image_size=4,
        num_groups=4,
        num_times=2,
        time_scale=10.0,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return FlowMapNet(unet).train()


def _inputs(shape=(2,), n=16, seed=0):
    """``x, s < t, b``: points, times in (0, 1), a direction of the shape of ``x``."""
    g = torch.Generator().manual_seed(seed)
    x, b = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)
    s, t = torch.rand(2, n, generator=g).sort(0).values
    return x, s, t, b


def _tangent(name, s, t, b):
    return {"t": {"dt": torch.ones_like(t)}, "eulerian": {"dx": b, "ds": torch.ones_like(s)}}[name]


def _seeded(seed, fn, *args, **kwargs):
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


@pytest.mark.parametrize("network", ["tanh-net", "unet"])
@pytest.mark.parametrize("tangent", ["t", "eulerian"])
def test_finite_differences_under_dropout_match_the_jvp_of_the_same_masks(
    float64, network, tangent
):
    net, shape = (_net(), (2,)) if network == "tanh-net" else (_tiny_unet(), (1, 4, 4))
    x, s, t, b = _inputs(shape)
    kw = _tangent(tangent, s, t, b)
    jvp = _seeded(1, directional_derivative, net, x, s, t, **kw)
    fd_kw = {**kw, "method": "finite_difference", "step": 1e-4}
    fd = _seeded(1, directional_derivative, net, x, s, t, **fd_kw)
    torch.testing.assert_close(fd.value, jvp.value, rtol=0, atol=0)
    # Central differences of one sub-network err by O(h^2) ~ 1e-8; ahead and behind under two
    # masks differ by O(1) / 2h ~ 1e4.
    torch.testing.assert_close(fd.derivative, jvp.derivative, rtol=1e-6, atol=1e-8)
    # The value read off the two calls' midpoint is the same sub-network's, to O(h^2).
    bare = _seeded(1, directional_derivative, net, x, s, t, **fd_kw, value_graph=False)
    torch.testing.assert_close(bare.value, jvp.value.detach(), rtol=1e-7, atol=1e-9)
    other = _seeded(2, directional_derivative, net, x, s, t, **kw)
    assert not torch.allclose(other.value, jvp.value)  # dropout is on


@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
@pytest.mark.parametrize("tangent", ["t", "eulerian"])
def test_graph_free_tangents_under_dropout_give_the_values_and_gradients_with_graph(
    float64, method, tangent
):
    net = _net()
    x, s, t, b = _inputs()
    kw = {**_tangent(tangent, s, t, b), "method": method}
    graph = _seeded(1, directional_derivative, net.slope, x, s, t, **kw)
    free = _seeded(1, directional_derivative, net.slope, x, s, t, **kw, tangent_graph=False)
    assert not free.derivative.requires_grad
    torch.testing.assert_close(free.value, graph.value, rtol=0, atol=0)
    torch.testing.assert_close(free.derivative, graph.derivative.detach(), rtol=0, atol=0)
    params = list(net.parameters())
    grads = [torch.autograd.grad(d.value.sum(), params) for d in (free, graph)]
    for a, c in zip(*grads, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_a_group_replays_its_entry_state_and_leaves_the_state_of_one_call():
    def group_of_two():
        with SharedRandomness("cpu") as inner:
            return inner(torch.rand, 3), inner(torch.rand, 3)

    reference = _seeded(0, torch.rand, 3)
    after_one = torch.get_rng_state()
    torch.manual_seed(0)
    with SharedRandomness(torch.device("cpu")) as shared:
        draws = [shared(torch.rand, 3), *shared(group_of_two), shared(torch.rand, 3)]
        shared(torch.zeros, 3)  # draws nothing: the state is then the entry one
    for draw in draws:
        torch.testing.assert_close(draw, reference, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), after_one)
    with SharedRandomness("cpu"):
        pass
    assert torch.equal(torch.get_rng_state(), after_one)  # no call: nothing changes


def _derivative_value(net, x, s, t, v, **options):
    return directional_derivative(net.slope, x, s, t, dx=v, ds=torch.ones_like(s), **options).value


def _without_velocity(loss):
    return lambda net, x, s, t, v, **options: loss(net, x, s, t, **options)


def _psd_midpoint(net, x, s, t, v):
    return progressive_self_distillation_loss(net, x, s, t, torch.full_like(s, 0.5))


def _shortcut(net, x, s, t, v):
    return shortcut_loss(net, x, s, 0.5 * (t - s), 0.5 * (t - s))


def _tvm(net, x, s, t, v):
    return terminal_velocity_loss(net, x, s, t, x, t, v)


FD = {"method": "finite_difference"}
# Each residual as ``kernel(net, x, s, t, v, **options)``.
KERNELS = {
    "derivative-fd": (_derivative_value, FD),
    "derivative-graph-free": (_derivative_value, {"tangent_graph": False}),
    "lsd": (_without_velocity(lagrangian_self_distillation_loss), {}),
    "lsd-fd": (_without_velocity(lagrangian_self_distillation_loss), FD),
    "esd": (_without_velocity(eulerian_self_distillation_loss), {}),
    "esd-fd": (_without_velocity(eulerian_self_distillation_loss), FD),
    "psd-mid": (_psd_midpoint, {}),
    "meanflow-fd": (meanflow_loss, FD),
    "meanflow-graph-free": (meanflow_loss, {"tangent_graph": False}),
    "shortcut": (_shortcut, {}),
    "alpha-flow": (alpha_flow_loss, {"alpha": 0.5}),
    "imf": (improved_meanflow_loss, {}),
    "imf-fd": (improved_meanflow_loss, FD),
    "imf-graph-free": (improved_meanflow_loss, {"tangent_graph": False}),
    "scm": (continuous_consistency_loss, {}),
    "scm-fd": (continuous_consistency_loss, FD),
    "tvm": (_tvm, {}),
}
OWN_MASKS = {"tvm": 1}  # final calls that draw their own masks: TVM's flow matching at time u


@pytest.mark.parametrize("name", KERNELS)
def test_the_calls_of_one_residual_share_masks_and_advance_the_rng_as_one_call(name):
    (kernel, options), own_masks = KERNELS[name], OWN_MASKS.get(name, 0)
    net = _net()
    x, s, t, v = _inputs()
    _seeded(3, net.slope, x, s, t)
    after = [torch.get_rng_state()]  # after one call, then after each independent one
    for _ in range(own_masks):
        net(x, s, t)
        after.append(torch.get_rng_state())
    net.backbone.call_states.clear()
    _seeded(3, kernel, net, x, s, t, v, **options)
    states = net.backbone.call_states
    shared = states[: len(states) - own_masks]
    assert len(shared) > 1
    assert all(torch.equal(state, shared[0]) for state in shared)
    for state, expected in zip(states[len(shared) :], after, strict=False):
        assert torch.equal(state, expected)
    assert torch.equal(torch.get_rng_state(), after[-1])


def _objective_loss_and_grads(objective, seed, step=5):
    net = _net()
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(9)) + 1.0
    torch.manual_seed(seed)
    loss = objective(net, {"x1": x1}, step, torch.Generator().manual_seed(0)).mean()
    return loss, torch.autograd.grad(loss, list(net.parameters()))


OBJECTIVES = {
    "lsd": lambda method: SelfDistillationObjective(PATH, functools.partial(lsd, method=method)),
    "esd": lambda method: SelfDistillationObjective(PATH, functools.partial(esd, method=method)),
    "meanflow": lambda method: MeanFlowObjective(PATH, time_derivative=method),
    "meanflow-graph-free": lambda method: MeanFlowObjective(
        PATH, time_derivative=method, tangent_graph=False
    ),
    "imf": lambda method: ImprovedMeanFlowObjective(PATH, time_derivative=method),
    "tvm": lambda method: TerminalVelocityObjective(PATH, time_derivative=method),
    "scm": lambda method: ContinuousConsistencyObjective(
        PATH, warmup_steps=10, time_derivative=method
    ),
}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objectives_under_dropout_are_reproducible_and_their_derivative_methods_agree(
    float64, name
):
    build = OBJECTIVES[name]
    loss, grads = _objective_loss_and_grads(build("jvp"), seed=1)
    again, grads_again = _objective_loss_and_grads(build("jvp"), seed=1)
    torch.testing.assert_close(again, loss, rtol=0, atol=0)
    for a, b in zip(grads_again, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other, _ = _objective_loss_and_grads(build("jvp"), seed=2)
    assert not torch.allclose(other, loss)  # the global seed draws the dropout masks
    fd, fd_grads = _objective_loss_and_grads(build("finite_difference"), seed=1)
    # h = 1e-3 on raw times: O(h^2) ~ 1e-6 relative; unshared masks err by O(1) / h.
    torch.testing.assert_close(fd, loss, rtol=1e-4, atol=1e-8)
    for a, b in zip(fd_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_fused_lsd_refuses_a_network_that_draws_and_is_lsd_on_one_that_does_not(float64):
    # One call of a dropout network would give the two shifted maps different masks: an O(1) / h
    # error in the difference, so it is refused; without dropout it is LSD by finite differences.
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(9))
    fused = FusedLSDObjective(PATH)
    with pytest.raises(RuntimeError, match="draws random numbers"):
        fused(_net(), {"x1": x1}, 0, torch.Generator().manual_seed(0))
    separate = OBJECTIVES["lsd"]("finite_difference")
    losses = [
        o(_net(p=0.0), {"x1": x1}, 0, torch.Generator().manual_seed(0)) for o in (fused, separate)
    ]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("kind", [MeanFlowObjective, ImprovedMeanFlowObjective])
def test_meanflow_objectives_compute_the_time_derivative_they_are_given(kind):
    x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(9))
    calls = {}
    for method, graph in (("jvp", True), ("finite_difference", True), ("jvp", False)):
        net = _net(p=0.0)
        objective = kind(PATH, time_derivative=method, tangent_graph=graph)
        objective(net, {"x1": x1}, 0, torch.Generator().manual_seed(0))
        calls[method, graph] = len(net.backbone.call_states)
    # The diagonal rows' call (and iMF's tangent, the diagonal at the off-diagonal rows), then
    # the JVP (1), central differences (3) or a JVP and a value (2).
    first = 1 if kind is MeanFlowObjective else 2
    expected = {("jvp", True): 1, ("finite_difference", True): 3, ("jvp", False): 2}
    assert calls == {key: first + n for key, n in expected.items()}


class _ShiftedGaussian:
    def sample(self, n, generator):
        return 1.0 + torch.randn(n, 2, generator=generator, device=generator.device)


def test_a_run_with_dropout_and_finite_differences_resumes_bit_identically(tmp_path):
    cfg = TrainConfig(
        steps=6, batch_size=16, micro_batch_size=8, lr=1e-2, log_every=2, checkpoint_every=3,
        keep_checkpoints=None, device="cpu",
    )  # fmt: skip

    def run(folder, resume=False):
        model = _net()
        objective = MeanFlowObjective(PATH, time_derivative="finite_difference")
        train(model, objective, _ShiftedGaussian(), cfg, folder, resume=resume)
        return model

    full = run(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "crashed")
    (tmp_path / "crashed" / "checkpoints" / "ckpt-000006.safetensors").unlink()
    resumed = run(tmp_path / "crashed", resume=True)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
