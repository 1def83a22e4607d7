"""Sample quality of OT-coupled flow matching at 1 and 2 Euler steps, per coupling variant.

Each variant trains the preset for ``--steps`` steps from each seed through the command line
(with ``train.prefetch``, which changes no bit), then ``flowmatch eval`` measures the energy
distance of 1- and 2-step Euler samples against fresh target samples, beside the metric's noise.

    python benchmarks/ot_quality.py [--steps 4000] [--seeds 0,1,2] [--presets checkerboard,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "exact-ot": ["path.coupling=exact-ot"],
    "block 128": ["path.coupling=exact-ot", "path.ot_block_size=128"],
    "sorted block 128": [
        "path.coupling=exact-ot",
        "path.ot_block_size=128",
        "path.ot_blocks=sorted",
    ],
}


def energies(preset: str, steps: int, seed: int, extra: list[str], folder: Path) -> list[dict]:
    flowmatch = [sys.executable, "-m", "flowmatch"]
    train = [*flowmatch, "train", "--preset", preset, "--out", str(folder), "--max-steps"]
    train += [str(steps), f"train.seed={seed}", "train.prefetch=true", *extra]
    subprocess.run(train, check=True, capture_output=True, text=True)
    evaluate = [*flowmatch, "eval", str(folder), "--solver", "euler", "--steps", "1,2"]
    evaluate += ["--n", "4096", "--no-nll", "--json", "--seed", str(seed)]
    done = subprocess.run(evaluate, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)["quality"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--presets", default="checkerboard,eight-gaussians")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"energy distance x 1e-3 at 1 / 2 Euler steps, {args.steps} training steps, 4096 "
          f"samples, median [min-max] over seeds {args.seeds}")  # fmt: skip
    for preset in args.presets.split(","):
        for name, extra in VARIANTS.items():
            rows = [
                energies(preset, args.steps, s, extra, root / f"{preset}-{len(name)}-{s}")
                for s in seeds
            ]
            cells = []
            for k in (0, 1):
                values = [1e3 * r[k]["energy"] for r in rows]
                cells.append(
                    f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"
                )
            noise = statistics.median(1e3 * r[0]["energy_noise"] for r in rows)
            print(f"{preset:>16} {name:>17}: {cells[0]} / {cells[1]}  (noise {noise:.2f})")


if __name__ == "__main__":
    main()
