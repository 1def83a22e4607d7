"""Training speed of minibatch OT couplings against independent coupling, through the command line.

Every variant trains the same preset for the same steps on one training thread; the steps/s of
the run's second half (from its metrics.jsonl) are compared with independent coupling's, the
variants interleaved in each repeat so that machine load hits them alike. ``prefetch`` solves the
next step's exact OT in a background thread while the current step trains (``train.prefetch``):
its weights are bit-identical to plain exact OT (tests/test_app.py), so its quality is whole-batch
exact OT's by construction.

    python benchmarks/ot_prefetch.py [--steps 1000] [--repeats 3] [--presets checkerboard,...]
        [--batch 512] [--block-sizes 128] [--variants "sorted block 128 + prefetch",...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ot_quality import variants


def timed_variants(block_sizes: list[int]) -> dict[str, list[str]]:
    """Every OT variant of ``ot_quality.variants``, alone and with ``train.prefetch``."""
    named = {}
    for name, extra in variants(block_sizes).items():
        named[name] = extra
        if extra:
            named[f"{name} + prefetch"] = [*extra, "train.prefetch=true"]
    return named


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
    parser.add_argument("--block-sizes", default="128")
    parser.add_argument("--variants", help="comma-separated names (default: all)")
    args = parser.parse_args()
    named = timed_variants([int(b) for b in args.block_sizes.split(",")])
    chosen = args.variants.split(",") if args.variants else list(named)
    unknown = sorted(set(chosen) - set(named))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(named)}")
    variants_run = {"independent": [], **{n: named[n] for n in chosen}}
    root = Path(tempfile.mkdtemp())
    print(f"steps/s relative to independent coupling, batch {args.batch}, {args.steps} steps, "
          f"median [min-max] of {args.repeats} interleaved repeats")  # fmt: skip
    for preset in args.presets.split(","):
        speeds: dict[str, list[float]] = {name: [] for name in variants_run}
        for repeat in range(args.repeats):
            for name, extra in variants_run.items():
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
