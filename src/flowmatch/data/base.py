"""The one protocol every data source follows: draw ``n`` items with a given generator.

Toy 2-D distributions, user arrays and image sets all satisfy it, so training, metrics and
plotting take any of them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Dataset(Protocol):
    """A source of i.i.d. items of shape ``shape``; ``sample(n, generator) -> [n, *shape]``."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item (without the batch axis)."""
        ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...
