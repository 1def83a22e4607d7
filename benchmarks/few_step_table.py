"""Every flow-map objective against flow matching at equal training steps and equal wall-clock.

For each workload (a preset) and seed, through the command line:

- flow matching (independent and exact-OT coupling) trained ``--steps`` steps, sampled with 1,
  2, 4, 8 Euler steps (and dopri5 on images);
- every flow-map objective trained ``--steps`` steps (*equal steps*) and ``--steps / c`` steps
  (*equal wall-clock*, ``c`` its step cost relative to flow matching in the saved output of
  ``objective_cost.py``, its ``NAME:fd`` row for a time derivative by finite differences),
  sampled with 1, 2, 4, 8 jumps;
- with ``--ot-objectives``, those objectives at equal steps on minibatch-OT pairs (sorted
  blocks of 128, prefetched);
- the distillations (``lmd``, ``emd``, ``pfmm``, ``scd``) from a flow-matching teacher trained
  half the steps (with ``--teacher-overrides``, e.g. ``model.time_scale=1``), distilled the
  other half (the teacher's steps count).

An objective may carry config overrides, ``NAME:KEY=VALUE,...`` (``tvm:objective.target_ema=0.99``);
``--no-baselines`` leaves out the flow-matching rows.

Quality is the energy distance (2-D, 4096 samples) or the Frechet distance in the shipped LeNet
features (images, 1000 samples, or as many as the test split has: 297 on digits), next to the
metric's noise. Results go to ``--out`` as JSON and are printed as a markdown table (median
[min-max] over seeds).

    python benchmarks/few_step_table.py --presets checkerboard,eight-gaussians --seeds 0 \\
        --costs results/objective_cost_mlp.txt --out results/few_step_2d.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from cli_runs import FLOWMATCH, quality, run_cli, train_run
from flowmatch.app.config import RunConfig, with_overrides
from flowmatch.app.objectives import OBJECTIVES, time_derivative_of
from flowmatch.app.presets import preset_config

JUMPS = (1, 2, 4, 8)
IMAGE_PRESETS = ("digits", "mnist-small")
# Minibatch OT at about the price of independent coupling (BENCHMARKS.md): sorted blocks of 128,
# the next step's pairing prepared while the current step trains.
OT = [
    "path.coupling=exact-ot",
    "path.ot_block_size=128",
    "path.ot_blocks=sorted",
    "train.prefetch=true",
]
FLOW_MAPS = [n for n, e in OBJECTIVES.items() if e.is_flow_map and not e.teacher]
DISTILLED = [n for n, e in OBJECTIVES.items() if e.is_flow_map and e.teacher]


def _distill(teacher: Path, folder: Path, spec: str, steps: int, seed: int) -> None:
    name, overrides = split_spec(spec)
    command = [*FLOWMATCH, "distill", "--teacher", str(teacher), "--objective", name]
    command += ["--out", str(folder), "--max-steps", str(steps), f"train.seed={seed}"]
    run_cli([*command, *overrides[1:]])


def _trained_quality(train: Callable[[], None], folder: Path, n: int, seed: int) -> dict:
    """``_quality`` of the jumps after ``train()``; ``{}`` when training or sampling fails (a
    diverged run: the table says so)."""
    try:
        train()
        return quality(folder, "flow_map", list(JUMPS), n, seed)
    except (RuntimeError, FloatingPointError) as error:
        print(f"{folder.name}: {error}", file=sys.stderr)
        return {}


def read_costs(path: Path) -> dict[str, float]:
    """``{objective: step cost}``: the median column of ``objective_cost.py``'s saved table."""
    costs = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1][:1].isdigit():
            costs[cells[0]] = float(cells[1].split()[0])
    return costs


def cost_row(config: RunConfig) -> str:
    """The row of ``objective_cost.py``'s table that times a run of ``config``: ``NAME:fd`` when
    its time derivative is a finite difference, ``NAME`` (by JVP, or none) otherwise."""
    name = config.objective.name
    return f"{name}:fd" if time_derivative_of(config) == "finite_difference" else name


def split_spec(spec: str) -> tuple[str, list[str]]:
    """``"NAME:KEY=VALUE,..."`` -> ``(NAME, ["objective=NAME", "KEY=VALUE", ...])``."""
    name, _, overrides = spec.partition(":")
    return name, [f"objective={name}", *filter(None, overrides.split(","))]


def measure(args: argparse.Namespace, preset: str, seed: int, root: Path) -> dict[str, dict]:
    """``{row name: {label: (value, noise)}}`` of one workload and seed."""
    images = preset in IMAGE_PRESETS
    n = 1000 if images else 4096
    steps, out = args.steps, {}
    costs = read_costs(Path(args.costs)) if args.costs else {}
    if not args.no_baselines:
        fm = root / f"{preset}-fm-{seed}"
        train_run(preset, fm, steps, seed, [])
        out["fm (Euler)"] = quality(fm, "euler", list(JUMPS), n, seed)
        if images:
            out["fm (Euler)"].update(quality(fm, "dopri5", None, n, seed))
        else:
            ot = root / f"{preset}-ot-{seed}"
            train_run(preset, ot, steps, seed, ["path.coupling=exact-ot"])
            out["fm exact-OT (Euler)"] = quality(ot, "euler", list(JUMPS), n, seed)
    flow_map_preset = f"{preset}-flowmap" if not images else preset
    for index, spec in enumerate(args.objectives):
        name, overrides = split_spec(spec)
        if name not in FLOW_MAPS:
            continue
        config = with_overrides(preset_config(flow_map_preset), overrides)
        lengths, cost = {"equal steps": steps}, costs.get(cost_row(config))
        if cost is not None:
            lengths["equal time"] = max(1, round(steps / cost))
        for kind, length in lengths.items():
            folder = root / f"{preset}-{index}-{name}-{kind[6:]}-{seed}"
            train = partial(train_run, flow_map_preset, folder, length, seed, overrides)
            out[f"{spec}, {kind} ({length})"] = _trained_quality(train, folder, n, seed)
    for index, spec in enumerate(args.ot_objectives):
        name, overrides = split_spec(spec)
        folder = root / f"{preset}-{index}-{name}-ot-{seed}"
        train = partial(train_run, flow_map_preset, folder, steps, seed, [*overrides, *OT])
        out[f"{spec} + sorted block OT 128, equal steps"] = _trained_quality(train, folder, n, seed)
    distilled = [o for o in args.objectives if split_spec(o)[0] in DISTILLED]
    if distilled:
        teacher = root / f"{preset}-teacher-{seed}"
        train_run(preset, teacher, steps // 2, seed, args.teacher_overrides)
        of_teacher = "".join(f", teacher {o}" for o in args.teacher_overrides)
        for index, spec in enumerate(distilled):
            folder = root / f"{preset}-{index}-{split_spec(spec)[0]}-{seed}"
            row = f"{spec}, teacher {steps // 2} + {steps - steps // 2}{of_teacher}"
            distill = partial(_distill, teacher, folder, spec, steps - steps // 2, seed)
            out[row] = _trained_quality(distill, folder, n, seed)
    return out


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def report(results: dict[str, list[dict]]) -> str:
    lines = []
    for preset, runs in results.items():
        images = preset in IMAGE_PRESETS
        scale, unit = (1.0, "FD") if images else (1e3, "energy distance x 1e-3")
        labels = [*map(str, JUMPS), *(["dopri5"] if images else [])]
        noises = [
            abs(scale * cell[1]) for run in runs for row in run.values() for cell in row.values()
            if cell[1] is not None
        ]  # fmt: skip
        noise = f", metric noise ~{statistics.median(noises):.2f}" if noises else ""
        lines += [f"\n### {preset}: {unit}, {len(runs)} seed(s){noise}\n"]
        lines += ["| row | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        rows = list(dict.fromkeys(row for run in runs for row in run))  # every seed's rows
        for row in rows:
            measured = [run[row] for run in runs if row in run]
            cells = []
            for label in labels:
                values = [scale * m[label][0] for m in measured if label in m]
                if values:
                    cells.append(_cell(values))
                else:  # a run that diverged has no cell; dopri5 applies to velocities alone
                    cells.append("failed" if {} in measured else "-")
            seeds = f" ({len(measured)} seeds)" if len(measured) != len(runs) else ""
            lines.append(f"| {row}{seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="checkerboard,eight-gaussians")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--objectives", nargs="+", default=FLOW_MAPS + DISTILLED)
    parser.add_argument("--ot-objectives", nargs="*", default=[], help="also with OT pairs")
    parser.add_argument(
        "--teacher-overrides", nargs="*", default=[], help="KEY=VALUE settings of the teacher"
    )
    parser.add_argument("--costs", help="objective_cost.py's output, saved (equal wall-clock)")
    parser.add_argument("--out", type=Path, help="JSON results (a re-run adds its seeds)")
    parser.add_argument("--report-only", action="store_true", help="print --out's table")
    parser.add_argument("--no-baselines", action="store_true", help="no flow-matching rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [split_spec(spec)[0] for spec in args.objectives + args.ot_objectives]
    unknown = sorted(set(names) - set(FLOW_MAPS + DISTILLED))
    if unknown:
        parser.error(f"not flow-map objectives: {', '.join(unknown)}")
    results: dict[str, list[dict]] = {}
    if args.out is not None and args.out.exists():
        results = json.loads(args.out.read_text())
    root = Path(tempfile.mkdtemp())
    for preset in [] if args.report_only else args.presets.split(","):
        runs = [measure(args, preset, int(s), root) for s in args.seeds.split(",")]
        results[preset] = results.get(preset, []) + runs
        if args.out is not None:
            args.out.write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
