"""Runs trained through the ``flowmatch`` command line and their sample quality, for the
benchmarks that compare training settings (``few_step_table.py``, ``ot_quality.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from flowmatch.app.evaluation import generate
from flowmatch.app.runs import load_run, read_config
from flowmatch.data.toy import TOY_DATASETS
from flowmatch.metrics import energy_distance

FLOWMATCH = [sys.executable, "-m", "flowmatch"]


def run_cli(command: list[str]) -> str:
    """The standard output of ``command``; ``RuntimeError`` with its last error line."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip().splitlines()[-1]}")
    return done.stdout


def train_run(preset: str, folder: Path, steps: int, seed: int, extra: list[str]) -> None:
    """``flowmatch train --preset PRESET --max-steps STEPS train.seed=SEED EXTRA...``."""
    command = [*FLOWMATCH, "train", "--preset", preset, "--out", str(folder), "--max-steps"]
    run_cli([*command, str(steps), f"train.seed={seed}", *extra])


def quality(folder: Path, solver: str, steps: list[int] | None, n: int, seed: int) -> dict:
    """``{label: (value, noise)}`` per step count (``solver`` when ``steps`` is None): the energy
    distance of 2-D samples to ``n`` fresh target draws (unbiased: it may be negative), with the
    size of the same distance between two target samples as its noise (in this process:
    ``flowmatch eval`` also computes W2, slow at 4096), or the FD of images in the shipped
    LeNet features (``flowmatch eval``)."""
    name = read_config(folder).data.name
    if name not in TOY_DATASETS:  # images: flowmatch eval loads the run itself
        command = [*FLOWMATCH, "eval", str(folder), "--solver", solver, "--no-nll", "--json"]
        command += ["--n", str(n), "--seed", str(seed)]
        if steps is not None:
            command += ["--steps", ",".join(map(str, steps))]
        rows = json.loads(run_cli(command))["quality"]
        labels = [str(s) for s in steps] if steps is not None else [solver]
        return {
            label: (row["frechet_distance"], None) for label, row in zip(labels, rows, strict=True)
        }
    run = load_run(folder)
    target = TOY_DATASETS[name]()
    generator = torch.Generator().manual_seed(10_000 + seed)
    reference, other = target.sample(n, generator), target.sample(n, generator)
    noise = abs(float(energy_distance(other, reference)))
    results = {}
    for count in steps or []:
        samples = generate(run, n, method=solver, steps=count, seed=seed).x
        results[str(count)] = (float(energy_distance(samples, reference)), noise)
    return results
