"""A user's own array of samples: loading a ``.npy`` / ``.pt`` file, a seeded train/validation
split, and ``ArrayDataset``, which draws rows with replacement.

Files are read as data only: ``np.load(allow_pickle=False)`` and ``torch.load(weights_only=True)``.
Every problem with the file is one ``ValueError`` line that names the file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowmatch.data.base import draw_device

ARRAY_SUFFIXES = (".npy", ".pt")


class ArrayDataset:
    """Rows of ``data: [N, *dims]`` drawn uniformly with replacement.

    ``sample`` draws the indices on the generator's device and indexes ``data`` on its own
    device (the contract of :class:`~flowmatch.data.base.Dataset`).
    """

    def __init__(self, data: Tensor) -> None:
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"ArrayDataset needs data of shape [N, *dims], got {list(data.shape)}")
        self.data = data

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, *dims]`` rows drawn uniformly with replacement."""
        index = torch.randint(
            self.data.shape[0], (n,), generator=generator, device=draw_device(generator)
        )
        return self.data[index.to(self.data.device)]

    def to(self, device: torch.device | str) -> ArrayDataset:
        return ArrayDataset(self.data.to(device))


@dataclass(frozen=True)
class ArraySplit:
    """Disjoint train and validation rows of one array; ``validation`` is ``None`` at fraction 0."""

    train: ArrayDataset
    validation: ArrayDataset | None


def load_array(path: str | Path, dtype: torch.dtype = torch.float32) -> Tensor:
    """Read a numeric array ``[N, *dims]`` (N >= 1, at least one item axis) from ``.npy``/``.pt``.

    Raises ``ValueError`` for a missing file, another suffix, a file that is not one numeric
    array, an array with fewer than two axes or no rows, and non-finite values.
    """
    path = Path(path)
    if path.suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"{path}: expected a .npy or .pt file, got suffix {path.suffix!r}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            loaded = np.load(path, allow_pickle=False)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: holds pickled objects other than tensors, which are not loaded "
            "(save a plain tensor with torch.save(tensor))"
        ) from error
    except Exception as error:  # any other reader failure becomes the one-line error promised
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path}: cannot read as a plain array ({type(error).__name__}: {first_line})"
        ) from error
    if isinstance(loaded, np.ndarray):
        if not (
            np.issubdtype(loaded.dtype, np.integer) or np.issubdtype(loaded.dtype, np.floating)
        ):
            raise ValueError(f"{path}: expected integer or float data, got dtype {loaded.dtype}")
        native = loaded.dtype.newbyteorder("=")  # torch reads native byte order only
        tensor = torch.from_numpy(np.ascontiguousarray(loaded, dtype=native))
    elif isinstance(loaded, Tensor):
        if loaded.dtype == torch.bool or loaded.is_complex():
            raise ValueError(f"{path}: expected integer or float data, got dtype {loaded.dtype}")
        tensor = loaded
    else:
        raise ValueError(f"{path}: expected one tensor, got {type(loaded).__name__}")
    if tensor.dim() < 2 or tensor.shape[0] == 0:
        raise ValueError(
            f"{path}: expected shape [N, *dims] with N >= 1 and at least 2 axes, got "
            f"{list(tensor.shape)} (store scalars as [N, 1])"
        )
    tensor = tensor.to(dtype)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path}: contains NaN or infinite values")
    return tensor


def split_rows(data: Tensor, val_fraction: float = 0.1, seed: int = 0) -> ArraySplit:
    """Shuffle rows with ``seed`` and hold out ``round(val_fraction * N)`` (at least 1 if the
    fraction is positive) for validation; the same ``(data, fraction, seed)`` gives the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = data.shape[0]
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(
            f"too few rows ({n}) for a validation fraction of {val_fraction}: "
            "need at least one training and one validation row"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    validation = ArrayDataset(data[order[:n_val].to(data.device)]) if n_val else None
    return ArraySplit(ArrayDataset(data[order[n_val:].to(data.device)]), validation)


def load_array_dataset(
    path: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> ArraySplit:
    """``load_array`` then ``split_rows``: the user's file as train / validation datasets."""
    data = load_array(path, dtype)
    try:
        return split_rows(data, val_fraction, seed)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
