"""Metric writers beside ``metrics.jsonl``, chosen by ``TrainConfig.loggers`` and run by rank 0:
``csv`` (``metrics.csv``) and ``tensorboard`` (event files under ``tensorboard/``; needs the
``tensorboard`` extra).

Each writer gets every record the loop logs (``{"step", "loss", "lr", ...}``). A resumed run
starts a writer at the checkpoint's step, and the steps after it are dropped as
``metrics.jsonl`` drops them: the CSV file is cut back, TensorBoard purges them
(``purge_step``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Any, Protocol

from flowmatch.training.files import RunFileError, atomic_write, read_text

LOGGERS = ("csv", "tensorboard")
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard")}  # logger: (module, extra)
CSV_COLUMNS = ("step", "loss", "lr", "grad_norm", "steps_per_sec", "val_loss")


def missing_package(name: str) -> str | None:
    """The one-line install hint when logger ``name`` needs a package that is not installed."""
    if name not in PACKAGES:
        return None
    module, extra = PACKAGES[name]
    if importlib.util.find_spec(module) is not None:
        return None
    return f'logger {name} needs {module}, which is not installed: pip install "flowmatch[{extra}]"'


class MetricsWriter(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class CSVWriter:
    """``metrics.csv``: one row per record in ``CSV_COLUMNS`` (empty where a record has none).
    Rows are appended and flushed; a resumed run first keeps the rows up to ``start_step``."""

    FILE = "metrics.csv"

    def __init__(self, root: Path, start_step: int) -> None:
        self.path = root / self.FILE
        kept = io.StringIO()
        writer = csv.DictWriter(kept, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        if self.path.exists() or self.path.is_symlink():
            for row in csv.DictReader(io.StringIO(read_text(self.path, root=root))):
                if (row.get("step") or "").isdigit() and int(row["step"]) <= start_step:
                    writer.writerow(row)
        atomic_write(self.path, kept.getvalue().encode())  # a plain file, never a symlink
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(
            self.file, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n"
        )

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.writer.writerow(record)
            self.file.flush()
        except OSError as error:
            raise RunFileError(f"{self.path}: cannot write ({error})") from None

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """Scalars ``train/loss``, ``train/lr``, ... at their steps in ``tensorboard/``; a resumed
    run purges the events after ``start_step``."""

    FOLDER = "tensorboard"

    def __init__(self, root: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(root / self.FOLDER), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


WRITERS: dict[str, type[CSVWriter] | type[TensorBoardWriter]] = {
    "csv": CSVWriter,
    "tensorboard": TensorBoardWriter,
}


def open_writers(names: tuple[str, ...], root: Path, start_step: int) -> list[MetricsWriter]:
    """The writers ``names`` for the run folder ``root``, starting after ``start_step``."""
    return [WRITERS[name](root, start_step) for name in names]
