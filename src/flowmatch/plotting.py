"""Figures written to files: 2-D samples and densities, trajectories, loss curves,
quality-versus-steps curves and image grids.

Every function draws on a standalone ``matplotlib.figure.Figure`` (Agg canvas; no pyplot, so no
global figure state, no window and nothing left open), writes ``path`` (parent folders created;
the format follows the suffix, PNG for ``.png``) and returns it as a ``Path``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib.image
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from flowmatch.training.files import atomic_write

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _save(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` to ``path`` atomically (a symlink there is replaced, never followed)."""
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=120, format=path.suffix.lstrip(".") or "png")
    atomic_write(path, buffer.getvalue())
    return path


def _plot_range(points: np.ndarray) -> list[tuple[float, float]]:
    """Per-axis limits covering the central 99.8% of ``points: [n, 2]`` plus a 10% margin."""
    low, high = np.quantile(points, [0.001, 0.999], axis=0)
    margin = 0.1 * np.maximum(high - low, 1e-6)
    return [(low[i] - margin[i], high[i] + margin[i]) for i in range(2)]


def _density_panel(axes: Axes, points: np.ndarray, limits: list[tuple[float, float]]) -> None:
    axes.hist2d(points[:, 0], points[:, 1], bins=100, range=limits, cmap="viridis")
    axes.set_aspect("equal")


def plot_samples_2d(
    samples: ArrayLike,
    path: str | Path,
    target: ArrayLike | None = None,
    title: str | None = None,
) -> Path:
    """Scatter of ``samples: [n, 2]`` (over ``target`` in grey, if given) beside a 2-D histogram
    of ``samples``, and of ``target`` in a third panel; all panels share one range."""
    points = _numpy(samples)
    reference = None if target is None else _numpy(target)
    limits = _plot_range(points if reference is None else reference)
    panels = 2 if reference is None else 3
    figure = Figure(figsize=(4.2 * panels, 4.2), layout="constrained")
    axes = figure.subplots(1, panels, sharex=True, sharey=True)
    size = max(0.5, min(4.0, 4000 / len(points)))
    if reference is not None:
        axes[0].scatter(*reference.T, s=size, c="0.7", label="target", rasterized=True)
    axes[0].scatter(*points.T, s=size, c="tab:blue", alpha=0.6, label="samples", rasterized=True)
    axes[0].set(xlim=limits[0], ylim=limits[1], title="samples")
    axes[0].set_aspect("equal")
    if reference is not None:
        axes[0].legend(loc="upper right", markerscale=4)
    _density_panel(axes[1], points, limits)
    axes[1].set_title("sample density")
    if reference is not None:
        _density_panel(axes[2], reference, limits)
        axes[2].set_title("target density")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_trajectories_2d(
    trajectory: ArrayLike,
    path: str | Path,
    max_paths: int = 200,
    title: str | None = None,
) -> Path:
    """Paths of ``trajectory: [T, B, 2]`` (the first ``max_paths``), from the source points at
    ``T = 0`` (grey) to the end points (blue)."""
    states = _numpy(trajectory)
    if states.ndim != 3 or states.shape[2] != 2:
        raise ValueError(f"trajectory must have shape [T, B, 2], got {list(states.shape)}")
    states = states[:, :max_paths]
    figure = Figure(figsize=(5.0, 5.0), layout="constrained")
    axes = figure.subplots()
    axes.plot(states[:, :, 0], states[:, :, 1], color="tab:olive", alpha=0.35, linewidth=0.7)
    axes.scatter(states[0, :, 0], states[0, :, 1], s=6, c="0.5", label="t = 0", zorder=3)
    axes.scatter(states[-1, :, 0], states[-1, :, 1], s=6, c="tab:blue", label="t = 1", zorder=3)
    axes.set_aspect("equal")
    axes.legend(loc="upper right")
    axes.set_title(title or f"{states.shape[1]} trajectories, {states.shape[0]} states")
    return _save(figure, path)


def plot_loss_curve(
    steps: ArrayLike,
    losses: ArrayLike,
    path: str | Path,
    val_steps: ArrayLike | None = None,
    val: ArrayLike | None = None,
    title: str | None = None,
) -> Path:
    """Training loss against step (thin) with a running mean over ``len/50`` points, and the
    validation loss as markers; log-y when every value is positive."""
    steps_np, losses_np = _numpy(steps), _numpy(losses)
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.subplots()
    axes.plot(steps_np, losses_np, color="tab:blue", alpha=0.35, linewidth=0.8, label="train")
    window = len(losses_np) // 50
    if window > 1:
        running = np.convolve(losses_np, np.ones(window) / window, mode="valid")
        axes.plot(steps_np[window - 1 :], running, color="tab:blue", label="train (running mean)")
    values = [losses_np]
    if val_steps is not None and val is not None:
        val_np = _numpy(val)
        axes.plot(_numpy(val_steps), val_np, "o-", color="tab:orange", label="validation")
        values.append(val_np)
    if all((v > 0).all() for v in values):
        axes.set_yscale("log")
    axes.set(xlabel="step", ylabel="loss", title=title or "loss")
    axes.legend()
    return _save(figure, path)


def plot_quality_vs_steps(
    table: dict[str, dict[int, float]],
    path: str | Path,
    metric_name: str,
    noise_level: float | None = None,
    title: str | None = None,
    steps_name: str = "sampling steps",
) -> Path:
    """One curve per label of ``table`` (label -> steps -> metric) on a log-x axis ticked at the
    steps used; a dashed line marks ``noise_level``, the metric between two target samples."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.subplots()
    for label, by_steps in table.items():
        steps = sorted(by_steps)
        axes.plot(steps, [by_steps[s] for s in steps], "o-", label=label)
    if noise_level is not None:
        axes.axhline(
            noise_level, color="0.4", linestyle="--", label="noise level (target vs target)"
        )
    axes.set_xscale("log")
    all_steps = sorted({s for by_steps in table.values() for s in by_steps})
    axes.set_xticks(all_steps, [str(s) for s in all_steps])
    axes.minorticks_off()
    axes.set(xlabel=steps_name, ylabel=metric_name, title=title or metric_name)
    axes.legend()
    return _save(figure, path)


def image_grid(images: ArrayLike, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile ``images: [N, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) into a uint8 array ``[rows, cols]``
    (grayscale) or ``[rows, cols, 3]``, ``nrow`` images per row, ``padding`` black pixels apart."""
    array = _numpy(images)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {list(array.shape)}")
    n, channels, height, width = array.shape
    pixels = np.round((np.clip(array, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    columns = min(nrow, n)
    rows = -(-n // columns)
    grid = np.zeros(
        (channels, padding + rows * (height + padding), padding + columns * (width + padding)),
        dtype=np.uint8,
    )
    for index in range(n):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = pixels[index]
    return grid[0] if channels == 1 else grid.transpose(1, 2, 0)


def save_image_grid(images: ArrayLike, path: str | Path, nrow: int = 8, scale: int = 1) -> Path:
    """Write ``image_grid(images, nrow)`` with each pixel a ``scale x scale`` block (PNG for
    ``.png``); a scale above 1 makes small images such as 8x8 digits readable."""
    grid = image_grid(images, nrow).repeat(scale, axis=0).repeat(scale, axis=1)
    path, buffer = Path(path), io.BytesIO()
    image_format = path.suffix.lstrip(".") or "png"
    if grid.ndim == 2:
        matplotlib.image.imsave(buffer, grid, cmap="gray", vmin=0, vmax=255, format=image_format)
    else:
        matplotlib.image.imsave(buffer, grid, format=image_format)
    atomic_write(path, buffer.getvalue())
    return path
