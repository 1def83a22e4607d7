"""Inference time grids: monotone discretisations of an interval inside [0, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def uniform_time_grid(
    steps: int,
    t_start: float = 0.0,
    t_end: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``steps + 1`` equally spaced times from ``t_start`` to ``t_end`` (either order)."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=dtype)


def check_time_grid(time_grid: Tensor) -> None:
    """Raise ``ValueError`` unless the grid is 1-D, strictly monotone and inside [0, 1].

    Runs on the host once per sampling call, never per step.
    """
    if time_grid.dim() != 1 or time_grid.numel() < 2:
        raise ValueError(
            f"time_grid must be 1-D with at least 2 times, got {list(time_grid.shape)}"
        )
    grid = time_grid.detach().cpu()
    if grid.min() < 0.0 or grid.max() > 1.0:
        raise ValueError(
            f"time_grid must lie in [0, 1], got [{grid.min().item():.4g}, {grid.max().item():.4g}]"
        )
    diffs = grid.diff()
    if not (bool((diffs > 0).all()) or bool((diffs < 0).all())):
        raise ValueError("time_grid must be strictly monotone (increasing or decreasing)")
