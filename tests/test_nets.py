"""Networks: embeddings, MLP, U-Net, classifier-free guidance, flow-map parametrisation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flowmatch.nets import (
    MLP,
    FlowMapNet,
    GuidedVelocity,
    SinusoidalTimeEmbedding,
    UNet,
    drop_labels,
    unet_cifar10_paper,
    unet_mnist,
    warm_start_from_velocity,
)
from flowmatch.nets.unet import AttentionBlock

# A tiny U-Net with every part switched on (attention at 8x8 and in the middle, class labels).
TINY_UNET = {
    "in_channels": 1,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [4],
    "num_heads": 2,
    "image_size": 8,
    "num_groups": 4,
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Draw every parameter from N(0, 0.1^2): the zero-initialised output layers of the U-Net
    would otherwise make its output identically 0 and every check below trivially true."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.eval()


def test_time_embedding_closed_form_and_derivative():
    emb = SinusoidalTimeEmbedding(8, scale=1000.0, max_period=10000.0).double()
    t = torch.tensor([0.0, 0.013, 0.5, 1.0], dtype=torch.float64)
    freqs = 1000.0 * torch.tensor([10000.0 ** (-k / 4) for k in range(4)], dtype=torch.float64)
    args = t[:, None] * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    # The constants are built in the default dtype (float32): frequencies and the pi/2 phase are
    # rounded at 6e-8 relative, so at |a| <= 1000 the arguments are off by up to 6e-5.
    torch.testing.assert_close(emb(t), expected, rtol=0, atol=1e-4)
    # Not constant in t, and d/dt of the features by forward-mode AD matches the closed form.
    assert (emb(t[1:]) - emb(t[:1])).abs().amax(dim=1).min() > 0.1
    _, d_emb = torch.func.jvp(emb, (t,), (torch.ones_like(t),))
    expected_d = torch.cat([-freqs * torch.sin(args), freqs * torch.cos(args)], dim=1)
    torch.testing.assert_close(d_emb, expected_d, rtol=0, atol=1e-4 * 1000)
    # Two time inputs [B, 2] give the two feature blocks side by side.
    st = torch.stack([t, t.flip(0)], dim=-1)
    torch.testing.assert_close(emb(st), torch.cat([emb(t), emb(t.flip(0))], dim=1))
    assert "freqs" not in emb.state_dict()


@pytest.mark.parametrize("dim", [2, 5])
def test_mlp_shapes_and_time_dependence(dim):
    model = MLP(dim, hidden=32, depth=3)
    x = torch.randn(7, dim)
    out0 = model(x, torch.zeros(7))
    out1 = model(x, torch.full((7,), 0.5))
    assert out0.shape == x.shape
    assert (out0 - out1).abs().max() > 1e-4


def test_mlp_class_conditioning():
    model = MLP(2, hidden=16, depth=2, num_classes=3)
    assert model.null_label == 3 and model.label_embed.num_embeddings == 4
    x, t = torch.randn(4, 2), torch.rand(4)
    out_a = model(x, t, y=torch.tensor([0, 1, 2, 3]))
    out_b = model(x, t, y=torch.tensor([1, 1, 2, 3]))
    assert (out_a[0] - out_b[0]).abs().max() > 1e-5
    torch.testing.assert_close(out_a[1:], out_b[1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass y"):
        model(x, t)


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (TINY_UNET, (3, 1, 8, 8)),
        (unet_mnist(), (2, 1, 28, 28)),
        ({**TINY_UNET, "in_channels": 3, "channel_mult": [1, 2, 2], "image_size": 32,
          "attention_resolutions": [16]}, (2, 3, 32, 32)),
    ],
)  # fmt: skip
def test_unet_shapes_and_time_dependence(config, shape):
    model = randomize(UNet(**config))
    x = torch.randn(shape)
    out0 = model(x, torch.zeros(shape[0]))
    out1 = model(x, torch.full((shape[0],), 0.5))
    assert out0.shape == x.shape
    assert (out0 - out1).abs().max() > 1e-4


def test_unet_rejects_resolutions_it_does_not_have():
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(**{**unet_mnist(), "attention_resolutions": [16]})
    with pytest.raises(ValueError, match="divisible"):
        UNet(**{**unet_mnist(), "channel_mult": [1, 2, 2, 2]})  # 28 -> 14 -> 7 -> 3.5


def test_unet_config_round_trips_through_json():
    model = UNet(**TINY_UNET, num_classes=10)
    randomize(model)
    rebuilt = UNet(**json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())  # strict: same parameter names and shapes
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([3, 10])
    torch.testing.assert_close(rebuilt.eval()(x, t, y=y), model(x, t, y=y), rtol=0, atol=0)


def test_cifar10_paper_config_builds():
    with torch.device("meta"):
        model = UNet(**unet_cifar10_paper())
    # 153.1M: 256 channels, 2 blocks per level, multipliers (1, 2, 2, 2), scale-shift norm.
    assert sum(p.numel() for p in model.parameters()) == 153_094_915
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    # 2 blocks down + 3 up at 16x16, plus the middle block at 4x4; 512 channels = 8 heads of 64.
    assert len(blocks) == 6
    assert all(b.num_heads * 64 == b.norm.num_channels for b in blocks)


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
def test_flow_map_is_identity_on_the_diagonal(backbone):
    net = (
        MLP(3, hidden=16, depth=2, num_times=2)
        if backbone == "mlp"
        else UNet(**TINY_UNET, num_times=2)
    )
    flow_map = randomize(FlowMapNet(net))
    shape = (4, 3) if backbone == "mlp" else (4, 1, 8, 8)
    x, s, t = torch.randn(shape), torch.rand(4), torch.rand(4)
    assert torch.equal(flow_map(x, t, t), x)  # exact: x + 0 * v
    slope = flow_map.slope(x, s, t)
    assert slope.abs().max() > 1e-3
    t_minus_s = (t - s).view(-1, *[1] * (x.dim() - 1))
    torch.testing.assert_close(flow_map(x, s, t), x + t_minus_s * slope)
    torch.testing.assert_close(flow_map.velocity(x, t), flow_map.slope(x, t, t), rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
def test_warm_start_makes_the_flow_map_the_teachers_euler_step(backbone):
    def make(num_times: int) -> nn.Module:
        if backbone == "mlp":
            return MLP(3, hidden=16, depth=2, num_times=num_times)
        return UNet(**TINY_UNET, num_times=num_times)

    teacher, flow_map = randomize(make(1), seed=1), randomize(FlowMapNet(make(2)), seed=2)
    warm_start_from_velocity(flow_map, teacher)
    shape = (4, 3) if backbone == "mlp" else (4, 1, 8, 8)
    x, s, t = torch.randn(shape), torch.rand(4), torch.rand(4)
    euler = x + (t - s).view(-1, *[1] * (x.dim() - 1)) * teacher(x, s)
    assert teacher(x, s).abs().max() > 1e-2
    torch.testing.assert_close(flow_map(x, s, t), euler)
    torch.testing.assert_close(flow_map.velocity(x, t), teacher(x, t))
    # The t - s inputs start at zero and are trained from there.
    assert all(p.requires_grad for p in flow_map.parameters())
    with pytest.raises(ValueError, match="teacher"):
        warm_start_from_velocity(FlowMapNet(MLP(3, hidden=8, depth=2, num_times=2)), teacher)


def test_flow_map_requires_two_time_backbone():
    with pytest.raises(ValueError, match="num_times=2"):
        FlowMapNet(MLP(2))


def test_flow_map_unet_jvp_matches_central_differences():
    flow_map = FlowMapNet(UNet(**TINY_UNET, num_classes=3, num_times=2))
    assert flow_map.backbone.jvp_safe_attention  # set by the wrapper
    randomize(flow_map.double())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    s = torch.tensor([0.1, 0.3, 0.7], dtype=torch.float64)
    t = torch.tensor([0.6, 0.35, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    ones = torch.ones_like(t)
    h = 1e-6
    # Central differences err by h^2/6 |X'''| (~1e-7 here, the embedding frequencies reach 1000)
    # plus rounding ~1e-16 / h; a missing term in the derivative would be O(|dX/dt|) ~ 1.
    for wrt in ("t", "s"):

        def along(u, wrt=wrt):
            return flow_map(x, u, t, y=y) if wrt == "s" else flow_map(x, s, u, y=y)

        base = s if wrt == "s" else t
        value, tangent = torch.func.jvp(along, (base,), (ones,))
        fd = (along(base + h) - along(base - h)) / (2 * h)
        torch.testing.assert_close(value, along(base))
        assert tangent.abs().max() > 0.1
        torch.testing.assert_close(tangent, fd, rtol=0, atol=1e-5 * tangent.abs().max().item())
    # The slope and the diagonal velocity are differentiable in time too.
    _, d_slope = torch.func.jvp(lambda u: flow_map.slope(x, s, u, y=y), (t,), (ones,))
    _, d_velocity = torch.func.jvp(lambda u: flow_map.velocity(x, u, y=y), (t,), (ones,))
    assert d_slope.isfinite().all() and d_velocity.isfinite().all()


def test_jvp_tangent_backpropagates_in_float32():
    # The Lagrangian flow-map loss regresses d/dt X computed by jvp, so gradients flow through it;
    # float32 is where the fused attention kernels (no forward-mode AD) would be selected.
    flow_map = randomize(FlowMapNet(UNet(**TINY_UNET, num_times=2)))
    x, s, t = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2)
    _, dx_dt = torch.func.jvp(lambda u: flow_map(x, s, u), (t,), (torch.ones_like(t),))
    dx_dt.square().mean().backward()
    grads = [p.grad for p in flow_map.parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
def test_batch_independence(backbone):
    # The per-sample likelihood needs output i to depend only on input i (no batch statistics).
    if backbone == "mlp":
        model = randomize(MLP(3, hidden=16, depth=2).double())
        x = torch.randn(4, 3, dtype=torch.float64)
    else:
        model = randomize(UNet(**TINY_UNET).double())
        x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    out = model(x, t)
    x_moved, t_moved = x.clone(), t.clone()
    x_moved[2] += 1.0
    t_moved[2] = 1 - t[2]
    out_moved = model(x_moved, t_moved)
    assert (out_moved[2] - out[2]).abs().max() > 1e-3
    keep = [0, 1, 3]
    torch.testing.assert_close(out_moved[keep], out[keep], rtol=1e-12, atol=1e-12)


class CountingVelocity(nn.Module):
    """A class-conditional MLP that records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = randomize(MLP(2, hidden=16, depth=2, num_classes=3))
        self.null_label = self.net.null_label
        self.batch_sizes: list[int] = []

    def forward(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return self.net(x, t, y=y)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_velocity_is_one_doubled_forward_of_the_cfg_formula(w):
    model = CountingVelocity()
    x, t, y = torch.randn(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    guided = GuidedVelocity(model, guidance_scale=w)(x, t, y=y)
    assert model.batch_sizes == [10]
    v_cond = model(x, t, y)
    v_uncond = model(x, t, torch.full_like(y, 3))
    # Same rows through the same network: only matmul blocking in a different batch size differs.
    torch.testing.assert_close(guided, v_uncond + w * (v_cond - v_uncond), rtol=1e-5, atol=1e-6)


def test_drop_labels_is_per_sample_at_rate_p():
    n, p = 20000, 0.3
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, p, null_label=10, generator=torch.Generator().manual_seed(1))
    is_null = dropped == 10
    # Binomial(n, p) fraction: std sqrt(p (1 - p) / n) = 0.0032; 0.015 is ~4.6 std.
    assert abs(is_null.double().mean().item() - p) < 0.015
    assert torch.equal(dropped[~is_null], y[~is_null])
    again = drop_labels(y, p, null_label=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, dropped)
    assert torch.equal(drop_labels(y, 0.0, null_label=10), y)
    assert (drop_labels(y, 1.0, null_label=10) == 10).all()
    # Per sample: in batches of 8, the mix of dropped and kept rows occurs (not all-or-nothing).
    per_batch = is_null.view(-1, 8).sum(dim=1)
    assert ((per_batch > 0) & (per_batch < 8)).any()


def test_flow_map_jvp_through_the_unet_takes_channels_last_images():
    from flowmatch.losses import SelfDistillationObjective, lsd
    from flowmatch.paths import AffinePath, CondOTSchedule

    torch.manual_seed(0)
    backbone = UNet(
        in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(), num_groups=4, image_size=8, num_times=2,
    )  # fmt: skip
    objective = SelfDistillationObjective(AffinePath(CondOTSchedule()), lsd, diagonal_fraction=0.5)
    x1 = torch.randn(4, 3, 8, 8)
    losses = [
        objective(FlowMapNet(backbone), {"x1": batch}, 0, torch.Generator().manual_seed(1))
        for batch in (x1, x1.contiguous(memory_format=torch.channels_last))
    ]
    torch.testing.assert_close(losses[1], losses[0])
