"""``flowmatch train`` and ``flowmatch distill``: a config becomes a run folder with a trained
model. ``train`` starts from a preset; ``distill`` from a teacher run's config, with a flow-map
distillation objective (lmd, emd, pfmm) or reflow on the teacher's (noise, sample) pairs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from flowmatch import plotting
from flowmatch.presets import ObjectiveConfig, RunConfig, preset_config, with_overrides
from flowmatch.runs import (
    Data,
    build_data,
    build_model,
    build_objective,
    init_from_run,
    load_teacher,
    read_config,
    reflow_source,
    warm_start,
    write_spec,
)
from flowmatch.training import train
from flowmatch.training.checkpoint import checkpoint_to_resume
from flowmatch.training.config import ConfigError
from flowmatch.training.distributed import world_size_from_env


def finish_config(config: RunConfig, args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """Apply ``--max-steps``; on ``--resume`` the stored config must agree outside train/eval."""
    if args.max_steps is not None:  # a short run keeps at most its own length of warm-up
        warmup = min(config.train.warmup_steps, args.max_steps)
        train_cfg = dataclasses.replace(config.train, steps=args.max_steps, warmup_steps=warmup)
        config = dataclasses.replace(config, train=train_cfg)
    if args.resume and (run_dir / "config.json").exists():
        stored = read_config(run_dir)
        if dataclasses.replace(stored, train=config.train, eval=config.eval) != config:
            raise ConfigError(
                f"--resume: the config differs from {run_dir}/config.json outside the train and "
                "eval sections"
            )
    return config


def validation_loss(data: Data, objective, seed: int, n: int = 2048) -> Callable | None:
    """``validate(model)``: the objective's mean loss on a fixed validation draw, or None."""
    if data.validation is None:
        return None

    def validate(model: torch.nn.Module) -> float:
        generator = torch.Generator().manual_seed(seed)
        batch = {"x1": data.validation.sample(n, generator)}
        with torch.no_grad():
            return float(objective(model, batch, 0, generator).mean())

    return validate


def plot_losses(run_dir: Path) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    if not records:
        return
    val = [r for r in records if r.get("val_loss") is not None]
    plotting.plot_loss_curve(
        [r["step"] for r in records],
        [r["loss"] for r in records],
        run_dir / "loss.png",
        val_steps=[r["step"] for r in val] or None,
        val=[r["val_loss"] for r in val] or None,
    )


def run_training(config: RunConfig, run_dir: Path, resume: bool) -> None:
    """Build everything the config names and train it (any number of processes)."""
    # Refuse before the run folder is touched; a resumed run takes its weights from its checkpoint.
    fresh = checkpoint_to_resume(run_dir, resume) is None
    data = build_data(config)
    source, teacher, teacher_velocity = data.train, None, None
    model = build_model(config, data.spec)
    if config.objective.name in ("lmd", "emd", "pfmm", "reflow"):
        teacher = load_teacher(config)
        if config.objective.name == "reflow":
            source = reflow_source(config, teacher, run_dir)
        else:
            teacher_velocity = teacher.velocity(config.objective.teacher_guidance)
    # The starting weights: another run's, else the teacher's (objective.warm_start), else random.
    if fresh and config.model.init_from is not None:
        init_from_run(model, config.model.init_from)
    elif fresh and teacher is not None and config.objective.warm_start:
        warm_start(model, teacher.model)
    objective = build_objective(config, teacher_velocity)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        write_spec(run_dir, data.spec)
    validate = validation_loss(data, objective, config.train.seed)
    result = train(model, objective, source, config, run_dir, resume=resume, validate=validate)
    if main_process:
        plot_losses(run_dir)
        n = sum(p.numel() for p in model.parameters())
        print(
            f"trained {result.step} steps in {result.seconds:.1f} s ({n} parameters, world size "
            f"{world_size_from_env()}); run folder {run_dir}"
        )


def train_command(args: argparse.Namespace) -> None:
    run_dir = args.out or Path("runs") / args.preset
    config = with_overrides(preset_config(args.preset), list(args.overrides))
    run_training(finish_config(config, args, run_dir), run_dir, args.resume)


def distill_command(args: argparse.Namespace) -> None:
    teacher = read_config(args.teacher)
    if teacher.objective.is_flow_map:
        raise ConfigError(f"{args.teacher} is a flow-map run; the teacher must be a velocity")
    run_dir = args.out or Path("runs") / f"{Path(args.teacher).name}-{args.objective}"
    objective = ObjectiveConfig(  # the objective's own defaults, not the teacher's settings
        name=args.objective,
        teacher=str(args.teacher),
        label_dropout=teacher.objective.label_dropout,
        warm_start=True,
    )
    config = with_overrides(dataclasses.replace(teacher, objective=objective), list(args.overrides))
    run_training(finish_config(config, args, run_dir), run_dir, args.resume)
