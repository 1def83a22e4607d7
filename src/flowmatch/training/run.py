"""The run folder and what is written to it while training, by rank 0 only.

Layout of ``run_dir``: ``config.json`` (the run's config), ``meta.json`` (versions, git commit,
command line, world size, start time, and one entry per resume), ``metrics.jsonl`` (one JSON
record per logging step) and ``checkpoints/``. Progress goes to stderr: a tqdm bar on a terminal,
plain lines otherwise.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy
import torch
import tqdm

import flowmatch
from flowmatch.training.checkpoint import atomic_write


class RunDir:
    """Paths of a run folder, and the writes to it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.config = self.root / "config.json"
        self.meta = self.root / "meta.json"
        self.metrics = self.root / "metrics.jsonl"

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write(self.config, (json.dumps(config, indent=2) + "\n").encode())

    def write_meta(self, world_size: int, resumed_step: int | None) -> None:
        """Record this start; a resume keeps the first start and appends to ``resumes``."""
        start = {
            "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": sys.argv,
            "world_size": world_size,
            "git_commit": _git_commit(),
        }
        if resumed_step is not None and self.meta.exists():
            meta = json.loads(self.meta.read_text())
            meta.setdefault("resumes", []).append({"step": resumed_step, **start})
        else:
            versions = {
                "flowmatch": flowmatch.__version__,
                "torch": torch.__version__,
                "numpy": numpy.__version__,
                "python": platform.python_version(),
            }
            meta = {"versions": versions, **start}
        atomic_write(self.meta, (json.dumps(meta, indent=2) + "\n").encode())

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records with ``step <= step`` (those a resumed run will not write again).

        A line cut short by a crash is not valid JSON and is dropped too.
        """
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= step:
                kept.append(line + "\n")
        atomic_write(self.metrics, "".join(kept).encode())


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

    A context manager; when not ``enabled`` (ranks other than 0) it does nothing.
    """

    def __init__(self, run: RunDir, start_step: int, steps: int, enabled: bool = True) -> None:
        self.run, self.start_step, self.steps, self.enabled = run, start_step, steps, enabled
        self.file = self.bar = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self.file = open(self.run.metrics, "a")  # closed by __exit__
            if sys.stderr.isatty():
                self.bar = tqdm.tqdm(
                    total=self.steps, initial=self.start_step, unit="step", dynamic_ncols=True
                )
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        # flush() hands the line to the OS, so it survives the process being killed.
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
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
