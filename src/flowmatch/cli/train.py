"""``flowmatch train``: a preset plus overrides becomes a run folder with a trained model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from flowmatch import plotting
from flowmatch.presets import RunConfig, preset_config, with_overrides
from flowmatch.runs import Data, build_data, build_model, build_objective, read_config, write_spec
from flowmatch.training import train
from flowmatch.training.config import ConfigError
from flowmatch.training.distributed import world_size_from_env


def resolve_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """The preset with overrides; on ``--resume`` the stored config must agree with it."""
    config = with_overrides(preset_config(args.preset), list(args.overrides))
    if args.max_steps is not None:  # a short run keeps at most its own length of warm-up
        warmup = min(config.train.warmup_steps, args.max_steps)
        train = dataclasses.replace(config.train, steps=args.max_steps, warmup_steps=warmup)
        config = dataclasses.replace(config, train=train)
    if args.resume and (run_dir / "config.json").exists():
        stored = read_config(run_dir)
        if dataclasses.replace(stored, train=config.train, eval=config.eval) != config:
            raise ConfigError(
                f"--resume: the preset and overrides differ from {run_dir}/config.json outside "
                "the train and eval sections"
            )
    return config


def validation_loss(data: Data, objective, seed: int, n: int = 2048):
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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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


def train_command(args: argparse.Namespace) -> None:
    run_dir = args.out or Path("runs") / args.preset
    config = resolve_config(args, run_dir)
    data = build_data(config)
    model = build_model(config, data.spec)
    objective = build_objective(config)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        write_spec(run_dir, data.spec)
    result = train(
        model,
        objective,
        data.train,
        config,
        run_dir,
        resume=args.resume,
        validate=validation_loss(data, objective, config.train.seed),
    )
    if main_process:
        plot_losses(run_dir)
        n = sum(p.numel() for p in model.parameters())
        print(
            f"trained {result.step} steps in {result.seconds:.1f} s ({n} parameters, world size "
            f"{world_size_from_env()}); run folder {run_dir}"
        )
