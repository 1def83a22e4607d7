"""Flow-map parametrisation ``X(x, s, t) = x + (t - s) v(x, s, t)`` over a two-time backbone.

Boffi, Albergo & Vanden-Eijnden (2024, eq. 4.1; 2025, eq. 6): ``X(x, t, t) = x`` holds by
construction, ``v(x, s, t)`` is the slope of the chord from ``x_s`` to ``x_t``, and its diagonal
``v(x, t, t)`` is the velocity of the flow. The backbone is a network built with
``num_times = 2`` (``MLP`` or ``UNet``) and is fed ``s`` and ``t - s``, whose embeddings are
added, as in the official self-distillation code. Forward-mode AD in ``s`` and ``t``
(``torch.func.jvp``) runs through ``forward``, ``slope`` and ``velocity``; the wrapper switches
the backbone's attention, if any, to the kernel that supports it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmatch.shapes import broadcast_time


class FlowMapNet(nn.Module):
    """``X(x, s, t) = x + (t - s) * backbone(x, s, t - s)``; ``x: [B, *dims]``, ``s, t: [B]``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if getattr(backbone, "num_times", None) != 2:
            raise ValueError("the backbone must take two time inputs (build it with num_times=2)")
        if hasattr(backbone, "jvp_safe_attention"):
            backbone.jvp_safe_attention = True
        self.backbone = backbone
        self.null_label = getattr(backbone, "null_label", None)

    def slope(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Tensor) -> Tensor:
        """``v(x, s, t)``: the average velocity ``(X(x, s, t) - x) / (t - s)`` over ``[s, t]``."""
        return self.backbone(x, s, t - s, **model_kwargs)

    def forward(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Tensor) -> Tensor:
        return x + broadcast_time(t - s, x) * self.slope(x, s, t, **model_kwargs)

    def velocity(self, x: Tensor, t: Tensor, **model_kwargs: Tensor) -> Tensor:
        """``v(x, t, t)``, the diagonal: the instantaneous velocity at time ``t``."""
        return self.backbone(x, t, torch.zeros_like(t), **model_kwargs)
