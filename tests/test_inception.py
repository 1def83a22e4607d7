"""pytorch-fid's Inception-v3: layout of the state dict, the FID-specific blocks, input
handling, and the sha256 gate on the weights file. No real weights exist here, so the network
runs with random weights scaled to keep activations of order one."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from flowmatch.metrics import inception
from flowmatch.metrics.inception import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_SHA256,
    InceptionV3,
    file_sha256,
    inception_features,
    load_inception,
)


@pytest.fixture(scope="module")
def network() -> InceptionV3:
    """Random network in eval mode; He-normal convolutions keep the second moment through the
    94 conv-BN-ReLU layers (PyTorch's default init shrinks the features to ~1e-8)."""
    torch.manual_seed(0)
    model = InceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            torch.nn.init.normal_(module.weight, std=math.sqrt(2 / fan_in))
    return model.eval().requires_grad_(False)


# ---- layout of pt_inception-2015-12-05-6726825d.pth --------------------------------------


def test_state_dict_has_the_pytorch_fid_layout(network):
    state = network.state_dict()
    # 94 conv-BN units: stem 5, Mixed_5b-d 3 x 7, Mixed_6a 4, Mixed_6b-e 4 x 10, Mixed_7a 6,
    # Mixed_7b-c 2 x 9; each has conv.weight and bn.{weight, bias, running_mean, running_var,
    # num_batches_tracked}; then fc.weight and fc.bias.
    assert len(state) == 94 * 6 + 2 == 566
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": [32, 3, 3, 3],
        "Conv2d_1a_3x3.bn.running_var": [32],
        "Conv2d_2b_3x3.conv.weight": [64, 32, 3, 3],
        "Conv2d_3b_1x1.conv.weight": [80, 64, 1, 1],
        "Conv2d_4a_3x3.conv.weight": [192, 80, 3, 3],
        "Mixed_5b.branch5x5_2.conv.weight": [64, 48, 5, 5],
        "Mixed_5b.branch_pool.conv.weight": [32, 192, 1, 1],
        "Mixed_5d.branch1x1.conv.weight": [64, 288, 1, 1],
        "Mixed_6a.branch3x3.conv.weight": [384, 288, 3, 3],
        "Mixed_6b.branch7x7_2.conv.weight": [128, 128, 1, 7],
        "Mixed_6b.branch7x7dbl_2.conv.weight": [128, 128, 7, 1],
        "Mixed_6e.branch7x7dbl_5.conv.weight": [192, 192, 1, 7],
        "Mixed_7a.branch3x3_2.conv.weight": [320, 192, 3, 3],
        "Mixed_7a.branch7x7x3_4.conv.weight": [192, 192, 3, 3],
        "Mixed_7b.branch1x1.conv.weight": [320, 1280, 1, 1],
        "Mixed_7b.branch3x3dbl_1.conv.weight": [448, 1280, 1, 1],
        "Mixed_7b.branch3x3dbl_3b.conv.weight": [384, 384, 3, 1],
        "Mixed_7c.branch3x3_2a.conv.weight": [384, 384, 1, 3],
        "Mixed_7c.branch_pool.conv.weight": [192, 2048, 1, 1],
        "fc.weight": [1008, 2048],
        "fc.bias": [1008],
    }
    for key, shape in expected_shapes.items():
        assert list(state[key].shape) == shape, key
    assert not any("AuxLogits" in key for key in state)
    assert network.name == "inception-v3-pytorch-fid"
    assert all(
        module.conv.bias is None and module.bn.eps == 1e-3
        for module in network.modules()
        if isinstance(module, inception.BasicConv2d)
    )
    # torchvision's Inception-v3 without AuxLogits has 23,834,568 parameters for 1000 classes;
    # 8 more logits add 8 x 2049
    assert sum(p.numel() for p in network.parameters()) == 23_834_568 + 8 * 2049


# ---- FID-specific blocks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "in_channels", "pool_channels", "pool"),
    [
        ("Mixed_5b", 192, 32, "avg"),
        ("Mixed_6b", 768, 192, "avg"),
        ("Mixed_7b", 1280, 192, "avg"),
        ("Mixed_7c", 2048, 192, "max"),
    ],
)
def test_pool_branch_is_pytorch_fids(network, block, in_channels, pool_channels, pool):
    """A, C and E_1 average over in-image neighbours only (TensorFlow); E_2 takes a max. The
    first channels are the 1x1 branch and the last ones the pool branch, in that order."""
    module = getattr(network, block)
    x = torch.randn(1, in_channels, 5, 5, generator=torch.Generator().manual_seed(1))
    out = module(x)
    tf_avg = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    padded_avg = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    expected_pool = F.max_pool2d(x, 3, stride=1, padding=1) if pool == "max" else tf_avg
    wrong_pool = tf_avg if pool == "max" else padded_avg
    # the same float32 operations in the same order: agreement to round-off
    torch.testing.assert_close(out[:, -pool_channels:], module.branch_pool(expected_pool))
    assert not torch.allclose(out[:, -pool_channels:], module.branch_pool(wrong_pool))
    first = module.branch1x1(x)
    torch.testing.assert_close(out[:, : first.shape[1]], first)


@pytest.mark.parametrize(("block", "in_channels"), [("Mixed_6a", 288), ("Mixed_7a", 768)])
def test_grid_reductions_pass_a_max_pool_through_last(network, block, in_channels):
    x = torch.randn(1, in_channels, 9, 9, generator=torch.Generator().manual_seed(2))
    out = getattr(network, block)(x)
    assert out.shape[2:] == (4, 4)
    torch.testing.assert_close(out[:, -in_channels:], F.max_pool2d(x, 3, stride=2))


# ---- input handling and features ----------------------------------------------------------


def test_features_of_grey_and_colour_images(network):
    g = torch.Generator().manual_seed(3)
    grey = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
    features = inception_features(network, grey, batch_size=1)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    # pool features average ReLU outputs: non-negative and, with the scaled init, not ~0
    assert (features >= 0).all() and features.std() > 0.05
    # a grey image is its three-channel repetition; batches do not interact in eval mode
    rgb = grey.expand(-1, 3, -1, -1)
    torch.testing.assert_close(inception_features(network, rgb, batch_size=2), features)

    # float32 network, features of order one: operations reordered at round-off level (e.g.
    # v * 2 / 255 against v * (2 / 255)) move features by ~1e-6 after ~100 layers
    float32 = {"rtol": 1e-4, "atol": 1e-5}
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    colour = inception_features(network, pixels)
    assert colour.shape == (2, 2048)
    # uint8 pixels v are pytorch-fid's 2 v / 255 - 1
    from_floats = inception_features(network, pixels.float() * 2 / 255 - 1)
    torch.testing.assert_close(from_floats, colour, **float32)
    # the resize is bilinear with align_corners=False: resizing first changes nothing
    resized = F.interpolate(
        pixels.float() * 2 / 255 - 1, size=(299, 299), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(inception_features(network, resized), colour, **float32)
    nearest = F.interpolate(pixels.float() * 2 / 255 - 1, size=(299, 299), mode="nearest")
    assert not torch.allclose(inception_features(network, nearest), colour, **float32)


def test_features_reject_other_channel_counts(network):
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, H, W\]"):
        inception_features(network, torch.zeros(1, 2, 8, 8))


# ---- the weights file ---------------------------------------------------------------------


def test_weights_hash_matches_the_prefix_in_the_file_name():
    prefix = INCEPTION_WEIGHTS_FILE.removesuffix(".pth").rsplit("-", 1)[1]
    assert prefix == "6726825d" and INCEPTION_WEIGHTS_SHA256.startswith(prefix)
    assert len(INCEPTION_WEIGHTS_SHA256) == 64


def _assert_refused(path):
    with pytest.raises(ValueError, match=INCEPTION_WEIGHTS_FILE) as error:
        load_inception(path)
    assert "\n" not in str(error.value)


def test_a_file_with_another_hash_is_refused(tmp_path):
    path = tmp_path / INCEPTION_WEIGHTS_FILE
    path.write_bytes(b"not the Inception weights")
    _assert_refused(path)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_only_the_known_file_loads_and_nothing_is_unpickled(network, tmp_path, monkeypatch):
    """A state dict of the right layout but other weights is refused under the expected name;
    with the gate pointed at the file's own hash (test-only) it loads exactly, and a file that
    carries code is still rejected by torch.load(weights_only=True)."""
    path = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    _assert_refused(path)

    monkeypatch.setattr(inception, "INCEPTION_WEIGHTS_SHA256", file_sha256(path))
    loaded = load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    payload = tmp_path / "payload.pth"
    torch.save({"fc.weight": _Payload()}, payload)
    monkeypatch.setattr(inception, "INCEPTION_WEIGHTS_SHA256", file_sha256(payload))
    with pytest.raises(pickle.UnpicklingError):
        load_inception(payload)
