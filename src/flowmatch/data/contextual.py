"""Data with a context vector per sample, and a 2-D target whose conditional law is known.

A context source's ``sample(n, generator)`` returns ``{"x1": [n, *shape], "context": [n, C]}``;
the objectives pass ``context`` to the network (and to a condition-aware coupling). Contexts
dropped for classifier-free guidance are rows of NaN (:func:`flowmatch.nets.drop_context`).

:class:`ContextGaussian` is the target of the ``gaussian-context`` preset: a context ``c``
uniform on ``[-span, span]^2`` and ``x | c ~ N(c, std^2 I)``, so every conditional law is
known and a model's samples at a given context can be compared with it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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


CONTEXT_DATASETS = {"gaussian-context": ContextGaussian}
