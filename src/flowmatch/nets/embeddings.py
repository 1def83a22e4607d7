"""Embeddings of the conditioning inputs: sinusoidal features of time and learned class labels.

``SinusoidalTimeEmbedding`` is the positional embedding of ADM / the Flow Matching paper,
``[cos(a * f_0 t), ..., cos(a * f_{h-1} t), sin(a * f_0 t), ..., sin(a * f_{h-1} t)]`` with
``f_k = max_period^(-k / h)``, ``h = dim / 2``. ADM feeds integer steps ``0..999``; here ``t`` lives
in ``[0, 1]`` and the documented ``scale a = 1000`` spreads it the same way. ``LabelEmbedding``
adds one learned row, index ``num_classes``, for the null label of classifier-free guidance;
``ContextEmbedding`` is a small MLP of a context vector with a learned "no context" row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal features of time: ``t: [B] -> [B, dim]``, or ``t: [B, k] -> [B, k * dim]``.

    ``cos(x) = sin(x + pi / 2)``, so the features are one fused ``sin(phase + t * freqs)`` over a
    frequency buffer built once; the forward pass has no host sync and is differentiable in
    ``t`` to any order (forward- and reverse-mode).
    """

    freqs: Tensor
    phase: Tensor

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be even and >= 2, got {dim}")
        self.dim = dim
        self.scale = scale
        self.max_period = max_period
        half = dim // 2
        k = torch.arange(half, dtype=torch.float64)
        freqs = scale * torch.exp(-math.log(max_period) * k / half)
        phase = torch.cat([torch.full((half,), math.pi / 2), torch.zeros(half)])
        dtype = torch.get_default_dtype()
        # Derived constants in the default dtype (`.double()` keeps their float32 values), not
        # weights: kept out of the state_dict.
        self.register_buffer("freqs", torch.cat([freqs, freqs]).to(dtype), persistent=False)
        self.register_buffer("phase", phase.to(dtype), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        return torch.sin(torch.addcmul(self.phase, t.unsqueeze(-1), self.freqs)).flatten(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, max_period={self.max_period}"


def time_input(
    x: Tensor, times: tuple[Tensor, ...], t: Tensor | float | None, num_times: int
) -> Tensor:
    """The time input of a network called as ``net(x, *times)`` or ``net(x=x, t=t)`` (the
    keyword form other libraries' solvers use): ``[B]`` for one time, ``[B, k]`` for ``k``. A
    scalar time (a float or a 0-dim tensor, as an ODE solver passes it) is the same for every
    sample; ``t=`` comes after any positional times."""
    if t is not None:
        times = (*times, torch.as_tensor(t, dtype=x.dtype, device=x.device))
    if len(times) != num_times:
        raise ValueError(f"expected {num_times} time input(s), got {len(times)}")
    batch = x.shape[0]
    times = tuple(s.expand(batch) if s.dim() == 0 or s.shape == (1,) else s for s in times)
    return times[0] if num_times == 1 else torch.stack(times, dim=-1)


class ContextEmbedding(nn.Module):
    """``context: [B, context_dim] -> [B, dim]``, ``W_2 silu(W_1 c + b_1) + b_2``.

    A row with any NaN is "no context" (dropped for classifier-free guidance, see
    :func:`flowmatch.nets.guidance.drop_context`) and gets the learned ``null`` embedding.
    """

    def __init__(self, context_dim: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.context_dim = context_dim
        self.net = nn.Sequential(nn.Linear(context_dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, context: Tensor) -> Tensor:
        if context.dim() != 2 or context.shape[1] != self.context_dim:
            raise ValueError(
                f"context must be [batch, {self.context_dim}], got {list(context.shape)}"
            )
        missing = context.isnan().any(dim=1, keepdim=True)
        emb = self.net(torch.nan_to_num(context, nan=0.0))
        return torch.where(missing, self.null.to(emb.dtype), emb)


def context_embedding(embed: ContextEmbedding | None, context: Tensor | None) -> Tensor | float:
    """``embed(context)`` for a context-conditioned network, ``0`` for one without; a
    ``ValueError`` when the one is given without the other."""
    if embed is None:
        if context is not None:
            raise ValueError("this network takes no context (build it with context_dim)")
        return 0.0
    if context is None:
        raise ValueError("context-conditioned model: pass context (rows of NaN for none)")
    return embed(context)


class LabelEmbedding(nn.Embedding):
    """Learned class embedding ``y: [B] -> [B, dim]`` with ``num_classes + 1`` rows.

    Row ``null_label = num_classes`` is the learned "no label" of classifier-free guidance.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__(num_classes + 1, dim)
        self.null_label = num_classes
