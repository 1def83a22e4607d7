"""The one protocol every data source follows: draw ``n`` items with a given generator.

Toy 2-D distributions, user arrays and image sets all satisfy it, so training, metrics and
plotting take any of them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


def draw_device(generator: torch.Generator | None) -> torch.device:
    """The device a source draws on: ``generator.device``, or the CPU without a generator."""
    return generator.device if generator is not None else torch.device("cpu")


@runtime_checkable
class Dataset(Protocol):
    """A source of i.i.d. items of shape ``shape``; ``sample(n, generator) -> [n, *shape]``.

    The device contract: every random draw of ``sample`` uses ``generator`` on its device
    (:func:`draw_device`; the training loop's generator lives on the training device), and an
    index is moved to the device of the tensor it indexes before indexing; the items come back
    on the device the data live on (the loop moves them to the training device). The draws are
    thus a function of the generator's state on any device, and no draw crosses devices.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one item (without the batch axis)."""
        ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...
