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

from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from flowmatch.shapes import broadcast_time


class _SwitchableAttention(Protocol):
    jvp_safe_attention: bool


class FlowMapNet(nn.Module):
    """``X(x, s, t) = x + (t - s) * backbone(x, s, t - s)``; ``x: [B, *dims]``, ``s, t: [B]``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if getattr(backbone, "num_times", None) != 2:
            raise ValueError("the backbone must take two time inputs (build it with num_times=2)")
        if hasattr(backbone, "jvp_safe_attention"):
            cast(_SwitchableAttention, backbone).jvp_safe_attention = True
        self.backbone = backbone
        self.null_label = getattr(backbone, "null_label", None)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the backbone in place (``nn.Module.compile``), which every method calls.
        Calls under ``torch.func.jvp`` still run eagerly: TorchDynamo does not trace inside
        functorch transforms."""
        self.backbone.compile(*args, **kwargs)

    def slope(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Tensor) -> Tensor:
        """``v(x, s, t)``: the average velocity ``(X(x, s, t) - x) / (t - s)`` over ``[s, t]``."""
        return self.backbone(x, s, t - s, **model_kwargs)

    def forward(
        self, x: Tensor, s: Tensor, t: Tensor | None = None, **model_kwargs: Tensor
    ) -> Tensor:
        if t is None:  # called as a velocity field v(x, t), e.g. by an ODE method
            raise TypeError(
                "a FlowMapNet is a two-time map X(x, s, t); for an ODE solver pass its diagonal "
                "velocity net.velocity (or sample with method='flow_map')"
            )
        return x + broadcast_time(t - s, x) * self.slope(x, s, t, **model_kwargs)

    def velocity(self, x: Tensor, t: Tensor, **model_kwargs: Tensor) -> Tensor:
        """``v(x, t, t)``, the diagonal: the instantaneous velocity at time ``t``."""
        return self.backbone(x, t, torch.zeros_like(t), **model_kwargs)


@torch.no_grad()
def warm_start_from_velocity(flow_map: FlowMapNet, velocity: nn.Module) -> None:
    """Start ``flow_map`` at the teacher's Euler step: ``X(x, s, t) = x + (t - s) v(x, s)``.

    ``velocity`` is the same backbone built with one time input. Every weight is copied; the
    time-input layer, wider by the ``t - s`` features (its inputs are ``[..., emb(s),
    emb(t - s)]``), takes the teacher's columns first and zeros for ``t - s``, so the slope
    ``v(x, s, t)`` equals ``v(x, s)`` at every ``t`` before training.
    """
    target = flow_map.backbone.state_dict()
    source = velocity.state_dict()
    if set(target) != set(source):
        raise ValueError("the teacher's network is not the flow map's backbone with one time input")
    for name, weight in source.items():
        slot = target[name]
        same_rows = slot.shape[:-1] == weight.shape[:-1]
        if slot.shape != weight.shape and not (same_rows and slot.shape[-1] > weight.shape[-1]):
            raise ValueError(f"{name}: teacher {tuple(weight.shape)}, flow map {tuple(slot.shape)}")
        slot.zero_()
        slot[..., : weight.shape[-1]] = weight
