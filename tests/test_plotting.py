"""Plotting: every function writes a non-empty PNG and returns its path; image grids are
checked pixel for pixel."""

import matplotlib.image
import numpy as np
import pytest
import torch

from flowmatch.data import Checkerboard
from flowmatch.plotting import (
    image_grid,
    plot_loss_curve,
    plot_quality_vs_steps,
    plot_samples_2d,
    plot_trajectories_2d,
    save_image_grid,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, expected):
    assert path == expected
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_figures_write_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    target = Checkerboard().sample(2000, g)
    samples = target + 0.1 * torch.randn(2000, 2, generator=g)
    path = tmp_path / "nested" / "samples.png"
    assert_png(plot_samples_2d(samples, path, target=target, title="checkerboard"), path)
    assert_png(plot_samples_2d(samples.numpy(), tmp_path / "alone.png"), tmp_path / "alone.png")

    time = torch.linspace(0, 1, 11)[:, None, None]
    x0 = torch.randn(1, 50, 2, generator=g)
    trajectory = (1 - time) * x0 + time * target[None, :50]
    assert_png(plot_trajectories_2d(trajectory, tmp_path / "paths.png"), tmp_path / "paths.png")
    with pytest.raises(ValueError, match=r"\[T, B, 2\]"):
        plot_trajectories_2d(trajectory[0], tmp_path / "bad.png")

    steps = np.arange(1, 501)
    losses = 1.0 + np.exp(-steps / 100)
    path = tmp_path / "loss.png"
    assert_png(plot_loss_curve(steps, losses, path, val_steps=[100, 500], val=[1.4, 1.1]), path)

    table = {"euler": {1: 2.0, 4: 0.6, 16: 0.2}, "rk4": {1: 1.0, 4: 0.1}}
    path = tmp_path / "quality.png"
    assert_png(plot_quality_vs_steps(table, path, "W2", noise_level=0.05), path)


def test_image_grid_pixels(tmp_path):
    # Five 1x3x4 grayscale images with values -1, 0, 1 in columns; nrow 2 gives a 3 x 2 grid
    # with 2-pixel black padding: height 2 + 3 * (3 + 2), width 2 + 2 * (4 + 2).
    images = torch.tensor([-1.0, 0.0, 1.0, 1.0]).expand(5, 1, 3, 4)
    grid = image_grid(images, nrow=2)
    assert grid.shape == (17, 14) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[2, 2:6], [0, 128, 255, 255])  # (x + 1) * 127.5, rounded
    assert grid[:2].max() == 0 and grid[12:, 8:].max() == 0  # padding and the empty last slot

    path = save_image_grid(images, tmp_path / "gray.png", nrow=2)
    read = matplotlib.image.imread(path)  # RGBA floats in [0, 1]
    np.testing.assert_allclose(read[..., 0] * 255, grid, atol=0.5)
    np.testing.assert_allclose(read[..., 0], read[..., 2])

    rgb = -torch.ones(3, 3, 2, 2)
    rgb[:, 0] = 1.0  # pure red
    path = save_image_grid(rgb, tmp_path / "rgb.png", nrow=3)
    read = matplotlib.image.imread(path)
    assert read.shape[:2] == (2 + 4, 2 + 3 * 4)
    np.testing.assert_allclose(read[2, 2, :3], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="1 or 3"):
        image_grid(torch.zeros(2, 2, 4, 4))
