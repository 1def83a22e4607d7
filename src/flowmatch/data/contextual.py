"""Data with a context vector per sample, and a 2-D target whose conditional law is known.

A context source's (:class:`ContextSource` of a target, :class:`ContextArrays` of the user's
files) ``sample(n, generator)`` returns ``{"x1": [n, *shape], "context": [n, C]}``;
the objectives pass ``context`` to the network (and to a condition-aware coupling). Contexts
dropped for classifier-free guidance are rows of NaN (:func:`flowmatch.nets.drop_context`).

:class:`ContextGaussian` is the target of the ``gaussian-context`` preset: a context ``c``
uniform on ``[-span, span]^2`` and ``x | c ~ N(c, std^2 I)``, so every conditional law is
known and a model's samples at a given context can be compared with it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flowmatch.data.arrays import ArrayDataset, load_array, split_rows
from flowmatch.nets.guidance import drop_context


@dataclass(frozen=True)
class ContextGaussian:
    """``c ~ U([-span, span]^2)``, ``x | c ~ N(c, std^2 I)`` in 2-D."""

    span: float = 2.0
    std: float = 0.25
    shape: tuple[int, ...] = (2,)
    context_dim: int = 2

    # The contexts at which ``flowmatch eval`` reports per-condition quality.
    eval_contexts: tuple[tuple[float, float], ...] = ((-1.5, -1.5), (0.0, 0.0), (1.5, -0.5))

    def sample_context(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, self.context_dim, generator=generator)
        return self.span * (2.0 * u - 1.0)

    def conditional_sample(
        self, context: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """One draw of ``x | c`` per row of ``context [n, 2]``."""
        return context + self.std * torch.randn(context.shape, generator=generator)

    def sample_with_context(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x1, context)``: ``n`` joint draws."""
        context = self.sample_context(n, generator)
        return self.conditional_sample(context, generator), context

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the marginal of ``x`` (contexts drawn and dropped)."""
        return self.sample_with_context(n, generator)[0]


class ContextSource:
    """Training batches ``{"x1", "context"}`` of a target with contexts (``sample_with_context``),
    each context dropped to NaN with probability ``dropout`` (guidance training)."""

    def __init__(self, target: ContextGaussian, dropout: float) -> None:
        self.target = target
        self.dropout = dropout
        self.shape = target.shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x1, context = self.target.sample_with_context(n, generator)
        return {"x1": x1, "context": drop_context(context, self.dropout, generator)}


class ContextArrays:
    """Rows of ``data [N, *dims]`` with their contexts ``context [N, C]``, drawn together
    uniformly with replacement (indices on the CPU from ``generator``), each context dropped to
    NaN with probability ``dropout``."""

    def __init__(self, data: ArrayDataset, context: ArrayDataset, dropout: float = 0.0) -> None:
        if len(data) != len(context) or len(context.shape) != 1:
            shape = [len(context), *context.shape]
            raise ValueError(f"contexts must be [N = {len(data)}, C], got {shape}")
        self.data, self.context, self.dropout = data.data, context.data, dropout
        self.shape = data.shape
        self.context_dim = context.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        index = torch.randint(self.data.shape[0], (n,), generator=generator)
        context = self.context[index.to(self.context.device)]
        return {
            "x1": self.data[index.to(self.data.device)],
            "context": drop_context(context, self.dropout, generator),
        }


def load_context_arrays(
    path: str | Path, context_path: str | Path, val_fraction: float = 0.1, dropout: float = 0.0
) -> tuple[ContextArrays, ContextArrays | None]:
    """The user's data file and its context file (``.npy``/``.pt``, ``[N, C]``; ``[N, 1]`` for
    one number per row) as train and validation sources; both split on the same rows
    (:func:`~flowmatch.data.arrays.split_rows`, seed 0). Validation keeps every context."""
    rows, contexts = load_array(path), load_array(context_path)
    if contexts.dim() != 2 or contexts.shape[0] != rows.shape[0]:
        raise ValueError(
            f"{context_path}: contexts must be [N, C] with the N = {rows.shape[0]} rows of "
            f"{path}, got {list(contexts.shape)}"
        )
    data, context = split_rows(rows, val_fraction), split_rows(contexts, val_fraction)
    train = ContextArrays(data.train, context.train, dropout)
    if data.validation is None or context.validation is None:
        return train, None
    return train, ContextArrays(data.validation, context.validation)


CONTEXT_DATASETS = {"gaussian-context": ContextGaussian}
