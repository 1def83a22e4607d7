"""Data with a context vector per sample, and a 2-D target whose conditional law is known.

A context source's (:class:`ContextSource` of a target, :class:`ContextArrays` of the user's
files) ``sample(n, generator)`` returns ``{"x1": [n, *shape], "context": [n, C]}``;
the objectives pass ``context`` to the network (and to a condition-aware coupling). Contexts
dropped for classifier-free guidance are rows of NaN (:func:`flowmatch.nets.drop_context`).
:func:`load_context_table` reads the contexts of named files (an image folder's) from a CSV or
JSON table, as data only.

:class:`ContextGaussian` is the target of the ``gaussian-context`` preset: a context ``c``
uniform on ``[-span, span]^2`` and ``x | c ~ N(c, std^2 I)``, so every conditional law is
known and a model's samples at a given context can be compared with it exactly.
"""

from __future__ import annotations

import csv
import io
import json
import reprlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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


CONTEXT_TABLE_SUFFIXES = (".csv", ".json")


class _Pairs(list):
    """A JSON object's ``(key, value)`` pairs in file order, repeated keys kept."""


def _csv_rows(path: Path, text: str) -> list[tuple[str, list[float]]]:
    """The ``(name, values)`` rows after the header row; every row as wide as the header."""
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    try:
        lines = [(reader.line_num, row) for row in reader if row]
    except csv.Error as error:
        raise ValueError(f"{path}: not a CSV table ({error})") from None
    if not lines or len(lines[0][1]) < 2:
        raise ValueError(
            f"{path}: expected a header row of a path column and at least one context column"
        )
    width = len(lines[0][1])
    rows = []
    for line, row in lines[1:]:
        if len(row) != width:
            raise ValueError(f"{path}: line {line} has {len(row)} columns, the header {width}")
        values = []
        for cell in row[1:]:
            try:
                values.append(float(cell))
            except ValueError:
                raise ValueError(f"{path}: line {line}: {cell!r} is not a number") from None
        rows.append((row[0], values))
    return rows


def _json_rows(path: Path, text: str) -> list[tuple[str, list[float]]]:
    """The ``(name, values)`` entries of a JSON object; every context as long as the first."""
    try:  # integers as floats: a huge one becomes inf (refused below), not an overflow
        loaded = json.loads(text, object_pairs_hook=_Pairs, parse_int=float)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(loaded, _Pairs):
        raise ValueError(f"{path}: expected a JSON object mapping each file's path to its context")
    rows: list[tuple[str, list[float]]] = []
    for name, value in loaded:
        values = value if isinstance(value, list) else [value]
        if not values or not all(type(v) is float for v in values):
            raise ValueError(
                f"{path}: the context of {name!r} is {reprlib.repr(value)}, not a number or a "
                "list of numbers"
            )
        if rows and len(values) != len(rows[0][1]):
            raise ValueError(
                f"{path}: {name!r} has {len(values)} values, {rows[0][0]!r} {len(rows[0][1])}"
            )
        rows.append((name, values))
    return rows


def load_context_table(path: str | Path, names: list[str]) -> Tensor:
    """The contexts ``[N, C]`` of the files ``names`` (paths relative to their folder, with
    ``/``), in that order, from the table at ``path``: a ``.csv`` with a header row and one row
    per file (its path, then C >= 1 numbers), or a ``.json`` object mapping each path to a list
    of C numbers (a number for C = 1). Read as data only.

    ``ValueError`` (one line naming the file) for another suffix, a missing or unparsable file,
    a value that is not a finite number, rows of unequal length, two rows for one path, a file
    without a row and a row naming none of ``names``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONTEXT_TABLE_SUFFIXES:
        raise ValueError(f"{path}: expected a .csv or .json table, got suffix {path.suffix!r}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read as text ({error})") from None
    table: dict[str, list[float]] = {}
    for name, values in (_csv_rows if suffix == ".csv" else _json_rows)(path, text):
        key = PurePosixPath(name).as_posix()  # ./a.png is a.png
        if key in table:
            raise ValueError(f"{path}: two rows for {key!r}")
        table[key] = values
    missing = [name for name in names if name not in table]
    if missing:
        more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: no context row for {missing[0]!r}{more}")
    unknown = sorted(table.keys() - set(names))
    if unknown:
        more = f" (and {len(unknown) - 1} more rows)" if len(unknown) > 1 else ""
        raise ValueError(f"{path}: the row {unknown[0]!r} names no image of the folder{more}")
    contexts = torch.tensor([table[name] for name in names], dtype=torch.float32)
    finite = torch.isfinite(contexts).all(1)
    if not finite.all():
        name = names[int(finite.logical_not().nonzero()[0])]
        raise ValueError(f"{path}: the context of {name!r} is not finite (as float32)")
    return contexts


CONTEXT_DATASETS = {"gaussian-context": ContextGaussian}
