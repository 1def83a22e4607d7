"""Multilayer perceptron for vector data: a velocity network ``v(x, t)`` with ``x: [B, dim]``.

The sinusoidal features of each time input are concatenated with ``x`` and fed to the first
linear map (so the projections of the time embeddings are added); an optional label embedding
and a context embedding (a small MLP of a context vector) are added to the first hidden
pre-activation. With ``num_times = 2`` the same network takes two
times (for a flow map: ``s`` and ``t - s``, see :class:`flowmatch.nets.flow_map.FlowMapNet`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flowmatch.nets.embeddings import (
    ContextEmbedding,
    LabelEmbedding,
    SinusoidalTimeEmbedding,
    context_embedding,
    time_input,
)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "selu": nn.SELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


class MLP(nn.Module):
    """``v(x, *times, y=None, context=None) -> [B, dim]``: ``depth`` hidden layers of width
    ``hidden``.

    ``h_1 = act(W_1 [x, emb(t_1), ..., emb(t_k)] + b_1 + E[y] + C(context))``,
    ``h_{l+1} = act(W h_l + b)``,
    output ``W_out h_depth + b_out`` (``depth + 1`` linear maps; torchcfm's default is
    ``hidden=64, depth=3, activation="selu"``, the FM paper's checkerboard used width 512).

    Args:
        dim: data dimension.
        hidden: width of every hidden layer.
        depth: number of hidden layers (>= 1).
        time_embed_dim: number of sinusoidal features per time input.
        activation: one of ``ACTIVATIONS``.
        num_classes: enables class conditioning ``y: LongTensor [B]`` in ``0..num_classes``,
            index ``num_classes`` being the null label.
        num_times: number of time inputs (1 for a velocity field, 2 for a flow map).
        context_dim: enables context conditioning ``context: [B, context_dim]`` (rows of NaN:
            no context), through :class:`~flowmatch.nets.embeddings.ContextEmbedding`.
        time_scale: ``scale`` of the sinusoidal embedding (``t`` in [0, 1]).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        time_embed_dim: int = 64,
        activation: str = "silu",
        num_classes: int | None = None,
        num_times: int = 1,
        time_scale: float = 1000.0,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.config: dict[str, Any] = {
            "dim": dim,
            "hidden": hidden,
            "depth": depth,
            "time_embed_dim": time_embed_dim,
            "activation": activation,
            "num_classes": num_classes,
            "num_times": num_times,
            "time_scale": time_scale,
            "context_dim": context_dim,
        }
        self.num_times = num_times
        self.time_embed = SinusoidalTimeEmbedding(time_embed_dim, scale=time_scale)
        self.input = nn.Linear(dim + num_times * time_embed_dim, hidden)
        self.label_embed = LabelEmbedding(num_classes, hidden) if num_classes is not None else None
        self.null_label = num_classes
        self.context_embed = ContextEmbedding(context_dim, hidden) if context_dim else None
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = [act()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), act()]
        layers.append(nn.Linear(hidden, dim))
        self.layers = nn.Sequential(*layers)

    def forward(
        self,
        x: Tensor,
        *times: Tensor,
        t: Tensor | float | None = None,
        y: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """``v(x, *times)``, or ``v(x=x, t=t)`` by keyword; a scalar ``t`` holds for the batch."""
        time = time_input(x, times, t, self.num_times)
        h = self.input(torch.cat([x, self.time_embed(time)], dim=-1))
        if self.label_embed is not None:
            if y is None:
                raise ValueError(f"class-conditional model: pass y (null label {self.null_label})")
            h = h + self.label_embed(y)
        h = h + context_embedding(self.context_embed, context)
        return self.layers(h)


class FlatItems(nn.Module):
    """A vector network applied to items of any shape: ``x: [B, *shape]`` is flattened to
    ``[B, prod(shape)]`` for ``net`` and its output reshaped back (an MLP over the flattened
    dimensions, e.g. for arrays ``[N, 4, 5]``); times and keyword inputs pass through."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.shape = tuple(shape)
        self.num_times = getattr(net, "num_times", 1)  # what FlowMapNet and guidance read
        self.null_label = getattr(net, "null_label", None)

    def forward(self, x: Tensor, *times: Tensor, **model_kwargs: Tensor) -> Tensor:
        out = self.net(x.flatten(1), *times, **model_kwargs)
        return out.reshape(x.shape[0], *self.shape)
