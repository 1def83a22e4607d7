"""Training speed of minibatch OT couplings against independent coupling, through the command line.

Every variant trains the same preset for the same steps on one training thread; the steps/s of
the run's second half (from its metrics.jsonl) are compared with independent coupling's, the
variants interleaved in each repeat so that machine load hits them alike. ``prefetch`` solves the
next step's exact OT in a background thread while the current step trains (``train.prefetch``):
its weights are bit-identical to plain exact OT (tests/test_app.py), so its quality is whole-batch
exact OT's by construction.

    python benchmarks/ot_prefetch.py [--steps 1000] [--repeats 3] [--presets checkerboard,...]
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
    "independent": [],
    "exact-ot": ["path.coupling=exact-ot"],
    "exact-ot + prefetch": ["path.coupling=exact-ot", "train.prefetch=true"],
    "block-ot 128": ["path.coupling=exact-ot", "path.ot_block_size=128"],
    "block-ot 128 + prefetch": [
        "path.coupling=exact-ot",
        "path.ot_block_size=128",
        "train.prefetch=true",
    ],
    "sorted block-ot 128": [
        "path.coupling=exact-ot",
        "path.ot_block_size=128",
        "path.ot_blocks=sorted",
    ],
    "sorted block-ot 128 + prefetch": [
        "path.coupling=exact-ot",
        "path.ot_block_size=128",
        "path.ot_blocks=sorted",
        "train.prefetch=true",
    ],
}


def steps_per_second(preset: str, steps: int, extra: list[str], batch: int, folder: Path) -> float:
    """The mean logged steps/s over the second half of one run."""
    command = [sys.executable, "-m", "flowmatch", "train", "--preset", preset, "--out", str(folder)]
    command += ["--max-steps", str(steps), "train.num_threads=1", "train.log_every=50"]
    command += [f"train.batch_size={batch}", "train.checkpoint_every=100000", *extra]
    subprocess.run(command, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    late = [r["steps_per_sec"] for r in records if r["step"] > steps // 2]
    return statistics.mean(late)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--presets", default="checkerboard,eight-gaussians")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    args = parser.parse_args()
    variants = {"independent": [], **{n: VARIANTS[n] for n in args.variants.split(",")}}
    root = Path(tempfile.mkdtemp())
    print(f"steps/s relative to independent coupling, batch {args.batch}, {args.steps} steps, "
          f"median [min-max] of {args.repeats} interleaved repeats")  # fmt: skip
    for preset in args.presets.split(","):
        speeds: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, extra in variants.items():
                folder = root / f"{preset}-{name.replace(' ', '')}-{repeat}"
                speeds[name].append(steps_per_second(preset, args.steps, extra, args.batch, folder))
        base = speeds["independent"]
        for name, values in speeds.items():
            ratios = [v / b for v, b in zip(values, base, strict=True)]
            print(
                f"{preset:>16} {name:>31}: {statistics.median(ratios):.2f} "
                f"[{min(ratios):.2f}-{max(ratios):.2f}]  ({statistics.median(values):.0f} steps/s)"
            )


if __name__ == "__main__":
    main()
