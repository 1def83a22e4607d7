"""The training loop's files in a run folder, written by rank 0 only.

Layout of ``run_dir``: ``config.json`` (the run's config), ``meta.json`` (versions, git commit,
command line, world size, start time, and one entry per resume), ``metrics.jsonl`` (one JSON
record per logging step) and ``checkpoints/``. Every write is atomic and never goes through a
symlink (:mod:`flowmatch.training.files`). Progress goes to stderr: a tqdm bar on a terminal,
plain lines otherwise.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy
import torch
import tqdm

import flowmatch
from flowmatch.training.files import RunFileError, atomic_write, describe_os_error, read_text
from flowmatch.training.loggers import MetricsWriter, open_writers


class RunDir:
    """Paths of the training loop's files in a run folder, and the writes to them."""

    CONFIG = "config.json"
    META = "meta.json"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / self.CHECKPOINTS
        self.config = self.root / self.CONFIG
        self.meta = self.root / self.META
        self.metrics = self.root / self.METRICS

    def create(self) -> None:
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunFileError(describe_os_error(self.checkpoints, error, "create")) from None

    def write(self, path: Path, data: bytes) -> None:
        """``data`` to ``path`` (a file of this folder), atomically and never through a symlink."""
        atomic_write(path, data, root=self.root)

    def write_json(self, path: Path, value: Any) -> None:
        self.write(path, (json.dumps(value, indent=2) + "\n").encode())

    def read_json(self, path: Path) -> Any:
        """The JSON value in ``path``; ``RunFileError`` naming the file if it is not JSON."""
        try:
            return json.loads(read_text(path, root=self.root))
        except json.JSONDecodeError as error:
            raise RunFileError(
                f"{path} is not valid JSON ({error.msg}, line {error.lineno})"
            ) from None

    def write_config(self, config: dict[str, Any]) -> None:
        self.write_json(self.config, config)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` that have an integer ``step``; a line cut short by a
        crash or written by something else is skipped."""
        if not self.metrics.exists():
            return []
        records = []
        for line in read_text(self.metrics, root=self.root).splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and type(record.get("step")) is int:
                records.append(record)
        return records

    def write_meta(self, world_size: int, resumed_step: int | None) -> None:
        """Record this start; a resume keeps the first start and appends to ``resumes``."""
        start = {
            "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": sys.argv,
            "world_size": world_size,
            "git_commit": _git_commit(),
        }
        meta = (
            self.read_json(self.meta) if resumed_step is not None and self.meta.exists() else None
        )
        if meta is not None and not (
            isinstance(meta, dict) and isinstance(meta.get("resumes", []), list)
        ):
            raise RunFileError(f"{self.meta} is not a flowmatch meta.json: move it away")
        if isinstance(meta, dict):
            meta.setdefault("resumes", []).append({"step": resumed_step, **start})
        else:
            versions = {
                "flowmatch": flowmatch.__version__,
                "torch": torch.__version__,
                "numpy": numpy.__version__,
                "python": platform.python_version(),
            }
            meta = {"versions": versions, **start}
        self.write_json(self.meta, meta)

    def truncate_metrics(self, step: int) -> None:
        """Keep the records with ``step <= step`` (those a resumed run will not write again)."""
        if self.metrics.exists() or self.metrics.is_symlink():
            kept = [json.dumps(r) + "\n" for r in self.read_metrics() if r["step"] <= step]
            self.write(self.metrics, "".join(kept).encode())


def _git_commit() -> str | None:
    """The commit checked out in the working directory, if it is a git repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Progress:
    """Metrics to ``metrics.jsonl`` and progress to stderr (a tqdm bar if it is a terminal).

    Each record also goes to the writers named in ``loggers`` (:mod:`flowmatch.training.loggers`),
    started after ``start_step``. A context manager; when not ``enabled`` (ranks other than 0) it
    does nothing.
    """

    def __init__(
        self,
        run: RunDir,
        start_step: int,
        steps: int,
        enabled: bool = True,
        loggers: tuple[str, ...] = (),
    ) -> None:
        self.run, self.start_step, self.steps, self.enabled = run, start_step, steps, enabled
        self.loggers = loggers
        self.file: TextIO | None = None
        self.bar: tqdm.tqdm | None = None
        self.writers: list[MetricsWriter] = []

    def __enter__(self) -> Progress:
        if self.enabled:
            # Appended to, never through a symlink (truncate_metrics has made it a plain file).
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
            try:
                fd = os.open(self.run.metrics, flags, 0o644)
            except OSError as error:
                raise RunFileError(describe_os_error(self.run.metrics, error, "write")) from None
            self.file = os.fdopen(fd, "a")  # closed by __exit__
            self.writers = open_writers(self.loggers, self.run.root, self.start_step)
            if sys.stderr.isatty():
                self.bar = tqdm.tqdm(
                    total=self.steps, initial=self.start_step, unit="step", dynamic_ncols=True
                )
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
        for writer in self.writers:
            writer.close()
        if self.bar is not None:
            self.bar.close()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        # flush() hands the line to the OS, so it survives the process being killed.
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            raise RunFileError(describe_os_error(self.run.metrics, error, "write")) from None
        for writer in self.writers:
            writer.write(record)
        shown = {k: v for k, v in record.items() if k in ("loss", "val_loss", "lr", "grad_norm")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            return
        step = record["step"]
        elapsed = time.perf_counter() - self.start
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = datetime.timedelta(seconds=round((self.steps - step) / rate)) if rate > 0 else "?"
        fields = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        print(f"step {step}/{self.steps} {fields} steps/s {rate:.1f} eta {eta}", file=sys.stderr)
