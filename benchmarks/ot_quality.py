"""Sample quality of OT-coupled flow matching at 1 and 2 Euler steps, per coupling variant.

Each variant trains the preset for ``--steps`` steps of ``--batch`` from each seed through the
command line (with ``train.prefetch``, which changes no bit), then measures 1- and 2-step Euler
samples beside the metric's noise: the energy distance to 4096 fresh target samples (2-D) or
the FD of 1000 images in the shipped LeNet features (digits). ``--block-sizes`` gives the
block-OT variants (consecutive and sorted blocks of each size): the curve of quality against
block size.

    python benchmarks/ot_quality.py [--steps 4000] [--seeds 0,1,2] [--presets checkerboard,...]
        [--batch 512] [--block-sizes 128] [--variants independent,exact-ot,...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from cli_runs import quality, train_run

OT = ["path.coupling=exact-ot"]


def variants(block_sizes: list[int]) -> dict[str, list[str]]:
    """Override lists by name: independent, whole-batch exact OT, and both kinds of blocks."""
    named = {"independent": [], "exact-ot": OT}
    for size in block_sizes:
        named[f"block {size}"] = [*OT, f"path.ot_block_size={size}"]
        named[f"sorted block {size}"] = [*OT, f"path.ot_block_size={size}", "path.ot_blocks=sorted"]
    return named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--presets", default="checkerboard,eight-gaussians")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--block-sizes", default="128")
    parser.add_argument("--variants", help="comma-separated names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    named = variants([int(b) for b in args.block_sizes.split(",")])
    chosen = args.variants.split(",") if args.variants else list(named)
    unknown = sorted(set(chosen) - set(named))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(named)}")
    root = Path(tempfile.mkdtemp())
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"1 / 2 Euler steps after {args.steps} steps of {args.batch}, median [min-max] "
          f"over seeds {args.seeds} (energy x 1e-3, 4096 samples; FD, 1000 images)")  # fmt: skip
    for preset in args.presets.split(","):
        images = preset == "digits"
        scale, n = (1.0, 1000) if images else (1e3, 4096)
        for name in chosen:
            rows = []
            for seed in seeds:
                folder = root / f"{preset}-{name.replace(' ', '-')}-{seed}"
                extra = [f"train.batch_size={args.batch}", "train.prefetch=true", *named[name]]
                train_run(preset, folder, args.steps, seed, extra)
                rows.append(quality(folder, "euler", [1, 2], n, seed))
            cells = []
            for label in ("1", "2"):
                values = [scale * r[label][0] for r in rows]
                cells.append(
                    f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"
                )
            noises = [scale * r["1"][1] for r in rows if r["1"][1] is not None]
            noise = f"  (noise {statistics.median(noises):.2f})" if noises else ""
            print(f"{preset:>16} {name:>17}: {cells[0]} / {cells[1]}{noise}", flush=True)


if __name__ == "__main__":
    main()
