"""The run folder: every file a run folder holds, named once, with validated reads and atomic,
symlink-safe writes.

The training loop's own files (``config.json``, ``meta.json``, ``metrics.jsonl``,
``checkpoints/``) are named by :class:`flowmatch.training.run.RunDir`; the application adds
``spec.json`` (what the network was built for), the teacher's ``reflow-pairs``, ``loss.png``,
the samples of ``flowmatch sample``, the reports of ``flowmatch eval`` and the ``export``
folder. Every write goes through :meth:`RunDir.write` (a temporary file renamed in the same
folder, never through a symlink that leaves it); every read refuses what is not a regular file
inside the folder, with one line.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from flowmatch.training.files import RunFileError
from flowmatch.training.run import RunDir


class RunFolder(RunDir):
    """A run folder (or an export folder: ``model.safetensors``, ``config.json``,
    ``spec.json``)."""

    SPEC = "spec.json"
    LOSS_PLOT = "loss.png"
    REFLOW_PAIRS = "reflow-pairs"
    SAMPLES = "samples.npz"
    TRAJECTORIES_PLOT = "trajectories.png"
    EXPORT = "export"
    WEIGHTS = "model.safetensors"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.spec = self.root / self.SPEC
        self.loss_plot = self.root / self.LOSS_PLOT
        self.reflow_pairs = self.root / self.REFLOW_PAIRS
        self.samples = self.root / self.SAMPLES
        self.trajectories_plot = self.root / self.TRAJECTORIES_PLOT
        self.export = self.root / self.EXPORT
        self.weights = self.root / self.WEIGHTS

    def eval_report(self, method: str, steps: list[int] | None) -> Path:
        """``eval-METHOD[-STEPS].json``; its plot has the same name with ``.png``."""
        counts = "" if not steps else "-" + "-".join(map(str, steps))
        return self.root / f"eval-{method}{counts}.json"

    def read_mapping(self, path: Path) -> dict[str, Any]:
        """The JSON object in ``path``; ``RunFileError`` naming the file for anything else."""
        value = self.read_json(path)
        if not isinstance(value, dict):
            raise RunFileError(f"{path} must hold a JSON object, not {type(value).__name__}")
        return value

    def write_npz(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=True, **arrays)
        self.write(path, buffer.getvalue())

    def write_outside(self, path: Path, data: bytes) -> None:
        """``data`` to a path the user named (``--out``), atomically, never through a symlink."""
        RunDir(path.parent).write(path, data)
