"""Shape conventions: batch-first tensors and per-sample times ``t: [B]``.

This module owns the one helper that broadcasts a per-sample time against a state, and the
checks that turn a wrong shape into a clear error.
"""

from __future__ import annotations

import torch
from torch import Tensor


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """View ``t: [B]`` as ``[B, 1, ..., 1]`` so that it broadcasts against ``x: [B, *dims]``."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def check_time(t: Tensor, x: Tensor, name: str = "t") -> None:
    """Raise ``ValueError`` unless ``t`` has shape ``[B]`` matching the batch of ``x``."""
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} must have shape [batch] = [{x.shape[0]}] to match x of shape "
            f"{list(x.shape)}, got {list(t.shape)}"
        )


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {list(a.shape)} and "
            f"{list(b.shape)}"
        )


def full_time(value: float | Tensor, x: Tensor) -> Tensor:
    """A time tensor ``[B]`` filled with ``value``, on the device and dtype of ``x``."""
    if isinstance(value, Tensor) and value.dim() == 1:
        return value.to(device=x.device, dtype=x.dtype)
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)
