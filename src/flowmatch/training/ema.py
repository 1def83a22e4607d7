"""Exponential moving average (EMA) of a model's weights, the weights used to sample and evaluate.

``theta_ema <- d theta_ema + (1 - d) theta`` after every optimiser step, with the decay
``d = min(decay, (1 + k) / (10 + k))`` at step ``k`` when ``warmup`` is on, so that short runs are
not dominated by the initial weights. Buffers (e.g. normalisation statistics) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """An EMA of ``model``'s weights, kept in ``module``: a copy in eval mode without gradients.

    The EMA follows the parameters ``model`` has when it is built (updating them in place, as
    optimisers and ``load_state_dict`` do, is fine).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # Listed once: walking the module tree every step costs more than the update itself.
        self._pairs: tuple[list[Tensor], list[Tensor]] = (
            list(self.module.parameters()),
            [p.detach() for p in model.parameters()],
        )
        self._buffer_pairs = [
            (mine, theirs.detach())
            for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True)
        ]

    def decay_at(self, step: int) -> float:
        """The decay used by the update after step ``step`` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def update(self, step: int) -> None:
        """Move the EMA towards the model's current weights, after optimiser step ``step``.

        No ``torch.no_grad()`` needed: no tensor involved requires a gradient.
        """
        torch._foreach_lerp_(*self._pairs, 1.0 - self.decay_at(step))
        for mine, theirs in self._buffer_pairs:
            mine.copy_(theirs)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the EMA weights."""
        model.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)
