"""Classifier-free guidance (Ho & Salimans 2022): label dropout in training, guided velocity.

A class-conditional network learns the unconditional velocity too when its label is replaced by
the null label (index ``num_classes``) for a random fraction of the samples (``drop_labels``).
``GuidedVelocity`` mixes the two branches at sampling time,
``v_w(x, t | y) = v(x, t | null) + w * (v(x, t | y) - v(x, t | null))``:
``w = 1`` is the plain conditional velocity, ``w = 0`` the unconditional one, ``w > 1`` guides.
(Meta's flow_matching writes ``(1 + w') v_cond - w' v_uncond``, i.e. ``w' = w - 1``.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowmatch.types import VelocityField


def drop_context(context: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """``context: [B, C]`` with each row set to NaN ("no context", the null embedding of
    :class:`flowmatch.nets.embeddings.ContextEmbedding`) independently with probability ``p``."""
    drop = torch.rand(context.shape[0], generator=generator, device=context.device) < p
    return context.masked_fill(drop[:, None], float("nan"))


def drop_labels(
    y: Tensor, p: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """``y: [B]`` with each entry set to ``null_label`` independently with probability ``p``."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return y.masked_fill(drop, null_label)


class GuidedVelocity(nn.Module):
    """The guided velocity field ``(x, t, y) -> v_uncond + w (v_cond - v_uncond)``.

    Both branches come from one forward pass of batch ``2B`` on ``[x, x]``, ``[t, t]``,
    ``[y, null]``. ``null_label`` defaults to ``model.null_label``. With ``on="context"`` the
    condition is a context ``[B, C]`` and its null branch rows of NaN (no context).
    """

    def __init__(
        self,
        model: VelocityField,
        guidance_scale: float,
        null_label: int | None = None,
        on: str = "y",
    ) -> None:
        super().__init__()
        if on not in ("y", "context"):
            raise ValueError(f"on must be 'y' or 'context', got {on!r}")
        self.on = on
        if null_label is None and on == "y":
            null_label = getattr(model, "null_label", None)
            if null_label is None:
                raise ValueError("pass null_label: the model has no null_label attribute")
        self.model = model
        self.guidance_scale = guidance_scale
        self.null_label = null_label

    def forward(self, x: Tensor, t: Tensor, **condition: Tensor) -> Tensor:
        c = condition[self.on]
        if self.on == "context":
            null = torch.full_like(c, math.nan)
        else:
            assert self.null_label is not None  # set in __init__ for on="y"
            null = torch.full_like(c, self.null_label)
        both = {self.on: torch.cat([c, null])}
        v = self.model(torch.cat([x, x]), torch.cat([t, t]), **both)
        v_cond, v_uncond = v.chunk(2)
        return torch.lerp(v_uncond, v_cond, self.guidance_scale)  # v_uncond + w (v_cond - v_uncond)
