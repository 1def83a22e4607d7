"""A run config becomes a run folder with a trained model: the config is settled (preset or
file, overrides, ``--resume``), checked against the run it continues by the one resume rule, and
everything it names is built before the folder is touched; then the library's loop trains it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flowmatch.app.build import (
    Data,
    build_data,
    build_model,
    build_objective,
    default_time_scale,
)
from flowmatch.app.config import ObjectiveConfig, RunConfig, read_config_file, with_overrides
from flowmatch.app.objectives import OBJECTIVES, target_ema_of, time_derivative_of
from flowmatch.app.presets import preset_config
from flowmatch.app.run_folder import RunFolder
from flowmatch.app.runs import (
    init_from_run,
    load_teacher,
    read_config,
    read_record,
    reflow_source,
    warm_start,
    write_spec,
)
from flowmatch.training import train
from flowmatch.training.checkpoint import (
    CheckpointError,
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
)
from flowmatch.training.config import (
    ConfigError,
    config_to_dict,
    may_change_on_resume,
    resolve_device,
)
from flowmatch.training.distributed import world_size_from_env


def settle_config(
    *,
    preset: str | None,
    config_file: Path | None,
    resume: Path | None,
    overrides: list[str],
    max_steps: int | None,
) -> RunConfig:
    """The config of a ``flowmatch train`` command: a preset, a config file or (``--resume RUN``
    alone) the run's stored config, then the overrides and ``--max-steps``."""
    if preset is not None and config_file is not None:
        raise ConfigError("give --preset or --config, not both")
    if preset is not None:
        base = preset_config(preset)
    elif config_file is not None:
        base = read_config_file(config_file)
    elif resume is not None:
        base = read_config(resume)
    else:
        raise ConfigError("give --preset NAME, --config FILE or --resume RUN")
    return _with_steps(with_overrides(base, overrides), max_steps)


def distill_config(
    teacher_dir: Path, objective: str, overrides: list[str], max_steps: int | None
) -> RunConfig:
    """The config of ``flowmatch distill``: the teacher's, with the distillation objective (its
    own defaults, not the teacher's settings) started from the teacher's weights."""
    teacher = read_config(teacher_dir)
    if OBJECTIVES[teacher.objective.name].is_flow_map:
        raise ConfigError(f"{teacher_dir} is a flow-map run; the teacher must be a velocity")
    config = dataclasses.replace(
        teacher,
        path=dataclasses.replace(teacher.path, coupling="independent", ot_block_size=None),
        objective=ObjectiveConfig(
            name=objective,
            teacher=str(teacher_dir),
            label_dropout=teacher.objective.label_dropout,
            warm_start=True,
        ),
    )
    return _with_steps(with_overrides(config, overrides), max_steps)


def _with_steps(config: RunConfig, max_steps: int | None) -> RunConfig:
    """``--max-steps``: a short run keeps at most its own length of warm-up."""
    if max_steps is None:
        return config
    if max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    warmup = min(config.train.warmup_steps, max_steps)
    train_cfg = dataclasses.replace(config.train, steps=max_steps, warmup_steps=warmup)
    return dataclasses.replace(config, train=train_cfg)


# The keys of a run config a resumed run may change: they leave the stream of updates as it is.
RESUMABLE = frozenset(may_change_on_resume(RunConfig))


def settle_time_scale(config: RunConfig) -> RunConfig:
    """``config`` with ``model.time_scale`` a number, as config.json records it: unset, it is
    that of the run whose weights start this one (``model.init_from``, or the teacher for a
    warm start: the copied weights expect its embedding), else
    :func:`~flowmatch.app.build.default_time_scale`."""
    if config.model.time_scale is not None:
        return config
    teacher = config.objective.teacher
    if config.model.init_from is not None:
        scale = read_config(config.model.init_from).model.time_scale
    elif config.objective.warm_start and teacher is not None:
        scale = read_config(teacher).model.time_scale
    else:
        scale = default_time_scale(config)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, time_scale=scale))


def settle_objective_defaults(config: RunConfig) -> RunConfig:
    """``config`` with ``objective.target_ema`` and ``objective.time_derivative`` as the
    objective resolves them (unset: its registry entry's), as config.json records them."""
    objective = dataclasses.replace(
        config.objective,
        target_ema=target_ema_of(config),
        time_derivative=time_derivative_of(config),
    )
    return dataclasses.replace(config, objective=objective)


def context_of(config: RunConfig) -> dict[str, Any]:
    """What the loop records beside its TrainConfig: every other section of the run config."""
    return {k: v for k, v in config_to_dict(config).items() if k != "train"}


def check_resume(config: RunConfig, run_dir: Path, resume: bool) -> None:
    """The resume rule, before any work: a fresh run refuses a folder with checkpoints; a
    resumed one must agree with its last checkpoint (the keys that differ, with both values)."""
    try:
        last = checkpoint_to_resume(run_dir, resume)
    except FileExistsError:
        raise FileExistsError(
            f"{run_dir} already has checkpoints: continue it with --resume {run_dir}, or "
            "choose a new --out folder"
        ) from None
    if last is None:
        return
    try:
        load_checkpoint(last, config_to_dict(config), read_record, RESUMABLE)
    except CheckpointError as error:
        raise CheckpointError(
            f"--resume {run_dir}: {error} (start a new run, e.g. with model.init_from={run_dir})"
        ) from None


def validation_loss(data: Data, objective: Any, seed: int, n: int = 2048) -> Callable | None:
    """``validate(model)``: the objective's mean loss on a fixed validation draw, or None."""
    validation = data.validation
    if validation is None:
        return None

    def validate(model: torch.nn.Module) -> float:
        generator = torch.Generator().manual_seed(seed)
        drawn = validation.sample(n, generator)  # data, or a dict with its contexts
        batch = drawn if isinstance(drawn, dict) else {"x1": drawn}
        with torch.no_grad():
            return float(objective(model, batch, 0, generator).mean())

    return validate


def plot_losses(folder: RunFolder) -> None:
    records = [r for r in folder.read_metrics() if isinstance(r.get("loss"), float | int)]
    if not records or importlib.util.find_spec("matplotlib") is None:
        return  # loss.png needs the plot extra; metrics.jsonl has the numbers
    from flowmatch import plotting

    val = [r for r in records if isinstance(r.get("val_loss"), float | int)]
    plotting.plot_loss_curve(
        [r["step"] for r in records],
        [r["loss"] for r in records],
        folder.loss_plot,
        val_steps=[r["step"] for r in val] or None,
        val=[r["val_loss"] for r in val] or None,
    )


def run_training(config: RunConfig, run_dir: Path, resume: bool) -> str:
    """Build everything the config names and train it (any number of processes); returns the
    summary line. Every check runs before the run folder is touched."""
    config = settle_objective_defaults(settle_time_scale(config))
    check_resume(config, run_dir, resume)
    device = resolve_device(config.train.device)
    fresh = latest_checkpoint(run_dir) is None
    data = build_data(config, device="cpu" if device.type == "cpu" else device)
    entry = OBJECTIVES[config.objective.name]
    folder = RunFolder(run_dir)
    teacher = load_teacher(config) if entry.teacher else None
    # The seed fixes the initial weights too: the same command twice gives the same bits.
    torch.manual_seed(config.train.seed)
    model = build_model(config, data.spec)
    # The starting weights: another run's, else the teacher's (objective.warm_start), else the
    # seeded initialisation; a resumed run takes its weights from its checkpoint alone.
    if fresh and config.model.init_from is not None:
        init_from_run(model, config.model.init_from)
    elif fresh and teacher is not None and config.objective.warm_start:
        warm_start(model, teacher.model)
    source, teacher_velocity = data.train, None
    if teacher is not None and entry.trains_on_teacher_pairs:
        source = reflow_source(config, teacher, folder)
    elif teacher is not None:
        teacher_velocity = teacher.velocity(config.objective.teacher_guidance)
    objective = build_objective(config, teacher_velocity)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        write_spec(folder, data.spec)
    validate = validation_loss(data, objective, config.train.seed)
    result = train(
        model,
        objective,
        source,
        config.train,
        run_dir,
        resume=resume,
        validate=validate,
        context=context_of(config),
        read_record=read_record,
        resumable_context=RESUMABLE,
    )
    if not main_process:
        return ""
    plot_losses(folder)
    n = sum(p.numel() for p in model.parameters())
    return (
        f"trained {result.step} steps in {result.seconds:.1f} s ({n} parameters, world size "
        f"{world_size_from_env()}); run folder {run_dir}"
    )
