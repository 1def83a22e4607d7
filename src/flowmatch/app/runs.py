"""Trained runs: ``load_run(FOLDER)`` returns the network (EMA weights) ready for ``sample`` and
``log_likelihood``, from a run folder, an export folder or a folder written by
``flowmatch.training.train``; ``export_run`` writes the weights as one safetensors file beside
the config. Also the teacher of a distillation, the warm start from it, ``model.init_from`` and
the cached reflow pairs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from flowmatch.app.build import DataSpec, build_model, build_path
from flowmatch.app.config import RunConfig, read_config_file
from flowmatch.app.objectives import OBJECTIVES, ObjectiveEntry
from flowmatch.app.run_folder import RunFolder
from flowmatch.nets import FlowMapNet, GuidedVelocity, warm_start_from_velocity
from flowmatch.paths import AffinePath
from flowmatch.reflow import ReflowPairs, cached_reflow_pairs
from flowmatch.training.checkpoint import (
    CheckpointError,
    check_state,
    latest_checkpoint,
    load_checkpoint,
)
from flowmatch.training.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from flowmatch.training.files import RunFileError, read_bytes
from flowmatch.types import FlowMap, VelocityField


@dataclass
class Run:
    """A trained run: ``model`` holds the EMA weights in eval mode."""

    run_dir: Path
    config: RunConfig
    spec: DataSpec
    model: nn.Module
    path: AffinePath
    step: int

    @property
    def objective(self) -> ObjectiveEntry:
        return OBJECTIVES[self.config.objective.name]

    @property
    def is_flow_map(self) -> bool:
        return self.objective.is_flow_map

    def velocity(self, guidance_scale: float | None = None) -> Callable[..., Tensor]:
        """The velocity field to integrate: the network, its diagonal for a flow map, and the
        guided combination of both label branches when ``guidance_scale`` is given."""
        field: VelocityField
        if not self.is_flow_map:
            field = self.model
        elif isinstance(self.model, FlowMap):
            field = self.model.velocity
        else:
            raise TypeError(
                f"a flow-map run needs a FlowMap model, got {type(self.model).__name__}"
            )
        if guidance_scale is None:
            return field
        if self.spec.context_dim is not None:
            return GuidedVelocity(field, guidance_scale, on="context")
        if self.spec.num_classes is None:
            raise ConfigError("guidance needs a class- or context-conditional run")
        return GuidedVelocity(field, guidance_scale, null_label=self.spec.num_classes)

    def source(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the path's source distribution, shaped like the data."""
        return self.path.schedule.sample_source((n, *self.spec.shape), generator=generator)


def read_config(run_dir: str | Path) -> RunConfig:
    """The ``config.json`` of a run or export folder; ``CheckpointError`` (one line) if it is
    missing or malformed."""
    folder = RunFolder(run_dir)
    if not folder.config.exists():
        raise CheckpointError(f"{run_dir} is not a flowmatch run folder (no config.json)")
    try:
        config = read_config_file(folder.config, root=folder.root)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    return _as_before_the_keys(config)


def _as_before_the_keys(config: RunConfig) -> RunConfig:
    """A run recorded before ``model.time_scale``, ``objective.target_ema`` and
    ``objective.time_derivative``: every network used the scale 1000, TVM its current
    parameters as the target (rate 0), and time derivatives the JVP."""
    if config.objective.time_derivative is None:
        objective = dataclasses.replace(config.objective, time_derivative="jvp")
        config = dataclasses.replace(config, objective=objective)
    if config.model.time_scale is None:
        model = dataclasses.replace(config.model, time_scale=1000.0)
        config = dataclasses.replace(config, model=model)
    has_target = OBJECTIVES[config.objective.name].target_ema is not None
    if config.objective.target_ema is None and has_target:
        objective = dataclasses.replace(config.objective, target_ema=0.0)
        config = dataclasses.replace(config, objective=objective)
    return config


def read_record(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored record (a checkpoint's config) as this version reads it: through the
    schema, so a key added since takes its default (``model.time_scale`` the 1000 of every run
    before it, ``objective.target_ema`` 0, ``objective.time_derivative`` the JVP).
    ``ConfigError`` if this version cannot read it."""
    return config_to_dict(_as_before_the_keys(config_from_dict(RunConfig, stored)))


def read_spec(folder: RunFolder) -> DataSpec:
    try:
        return DataSpec.from_dict(folder.read_mapping(folder.spec))
    except ValueError as error:
        raise CheckpointError(f"{folder.spec}: {error}") from None


def write_spec(folder: RunFolder, spec: DataSpec) -> None:
    folder.write_json(folder.spec, spec.to_dict())


def load_run(
    run_dir: str | Path, checkpoint: str | Path | None = None, model: nn.Module | None = None
) -> Run:
    """The run in ``run_dir`` at its last checkpoint (or ``checkpoint``), EMA weights, on CPU.

    ``run_dir`` is a run folder of ``flowmatch train``, an export folder of ``flowmatch export``
    (its ``model.safetensors``), or a folder written by ``flowmatch.training.train`` with your
    own network: pass that network as ``model`` (its weights are replaced by the EMA weights).
    Raises ``CheckpointError`` (one line) for a folder that is not a run, or a checkpoint that
    is corrupt, foreign or written with another config.
    """
    folder = RunFolder(run_dir)
    if model is None and not folder.spec.exists():
        raise CheckpointError(
            f"{run_dir} has no {RunFolder.SPEC}: if flowmatch.training.train wrote it, pass "
            "your network as load_run(RUN, model=net)"
        )
    config = read_config(folder.root) if model is None else _train_section(folder)
    spec = read_spec(folder) if model is None else DataSpec(shape=(1,))
    exported = checkpoint is None and latest_checkpoint(folder.root) is None
    if exported and folder.weights.exists():
        weights, step = _read_export(folder)
    else:
        weights, step = _read_checkpoint(folder, config, checkpoint, compare=model is None)
    model = model if model is not None else build_model(config, spec)
    check_state(folder.weights if exported else folder.root, "ema", weights, model.state_dict())
    model.load_state_dict(weights)
    model.eval().requires_grad_(False)
    return Run(folder.root, config, spec, model, build_path(config), step)


def _train_section(folder: RunFolder) -> RunConfig:
    """The config of a folder written by ``flowmatch.training.train``: its train section (the
    rest describes the caller's own network and data)."""
    if not folder.config.exists():
        raise CheckpointError(f"{folder.root} is not a training run folder (no config.json)")
    try:
        raw = folder.read_mapping(folder.config).get("train", {})
        return RunConfig(train=config_from_dict(TrainConfig, raw))
    except (RunFileError, ConfigError) as error:
        raise CheckpointError(f"{folder.config}: {error}") from None


def _read_checkpoint(
    folder: RunFolder, config: RunConfig, checkpoint: str | Path | None, compare: bool
) -> tuple[dict[str, Tensor], int]:
    """The EMA weights and step of ``checkpoint`` (default: the latest), at most the run's
    ``train.steps``; with ``compare``, its config must agree with ``config`` (the folder's
    config.json, rewritten at each resume) by the resume rule. Both are read through the
    schema, so a key added since takes its default."""
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(folder.root)
    if path is None:
        raise CheckpointError(f"{folder.root} has no checkpoint yet")
    expected = config_to_dict(config) if compare else None
    state = load_checkpoint(path, expected, read_record)
    if state.step > config.train.steps:
        raise CheckpointError(
            f"{path} is at step {state.step}, beyond the run's {config.train.steps}"
        )
    return state.ema, state.step


def _read_export(folder: RunFolder) -> tuple[dict[str, Tensor], int]:
    try:
        data = read_bytes(folder.weights, root=folder.root)
        weights = safetensors.torch.load(data)
        header = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header]).get("__metadata__") or {}
        step = int(metadata.get("step", 0)) if isinstance(metadata, dict) else 0
    except (RunFileError, SafetensorError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{folder.weights} is not a flowmatch export: {error}") from None
    return weights, step


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (EMA weights), ``config.json`` and ``spec.json`` to
    ``out_dir``; ``load_run(out_dir)`` reads them back. Returns the weights' path."""
    run = load_run(run_dir)
    out = RunFolder(out_dir)
    state = {k: v.contiguous() for k, v in run.model.state_dict().items()}
    out.write(out.weights, safetensors.torch.save(state, metadata={"step": str(run.step)}))
    out.write_config(config_to_dict(run.config))
    write_spec(out, run.spec)
    return out.weights


def load_teacher(config: RunConfig) -> Run:
    """The teacher run named by ``objective.teacher``; it must train a velocity."""
    if config.objective.teacher is None:
        raise ConfigError(f"objective {config.objective.name} needs objective.teacher=RUN_DIR")
    teacher = load_run(config.objective.teacher)
    if teacher.is_flow_map:
        raise ConfigError(
            f"{config.objective.teacher} is a flow-map run; the teacher must be a velocity"
        )
    return teacher


def warm_start(model: nn.Module, teacher: nn.Module) -> None:
    """Copy the ``teacher`` velocity's weights into ``model``: the same network, or a flow map
    whose backbone it is (:func:`~flowmatch.nets.warm_start_from_velocity`)."""
    try:
        if isinstance(model, FlowMapNet):
            warm_start_from_velocity(model, teacher)
        else:
            model.load_state_dict(teacher.state_dict())
    except (ValueError, RuntimeError) as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"objective.warm_start: {first} (objective.warm_start=false)") from None


def init_from_run(model: nn.Module, run_dir: str | Path) -> None:
    """Copy the EMA weights of the run in ``run_dir`` (its last checkpoint) into ``model``; a
    flow map started from a velocity run starts at its Euler step (:func:`warm_start`)."""
    source = load_run(run_dir).model
    if isinstance(model, FlowMapNet) and not isinstance(source, FlowMapNet):
        try:
            warm_start_from_velocity(model, source)
        except ValueError as error:
            raise ConfigError(
                f"model.init_from: {run_dir} holds another network ({error}): use its model "
                "settings"
            ) from None
        return
    theirs, ours = source.state_dict(), model.state_dict()

    def shape(state: dict[str, Tensor], key: str) -> str:
        return str(tuple(state[key].shape)) if key in state else "missing"

    misfit = sorted(k for k in theirs.keys() | ours.keys() if shape(theirs, k) != shape(ours, k))
    if misfit:
        key = misfit[0]
        raise ConfigError(
            f"model.init_from: {run_dir} holds another network ({len(misfit)} tensors differ; "
            f"{key}: {shape(theirs, key)} there, {shape(ours, key)} here): use its model settings"
        )
    model.load_state_dict(theirs)


def reflow_source(config: RunConfig, teacher: Run, folder: RunFolder) -> ReflowPairs:
    """The teacher's (noise, sample) pairs, generated once from ``train.seed`` and cached in
    the run folder's ``reflow-pairs``."""
    cfg = config.objective
    return cached_reflow_pairs(
        folder.reflow_pairs,
        teacher.velocity(),
        cfg.reflow_pairs,
        teacher.spec.shape,
        seed=config.train.seed,
        teacher_id=str(Path(teacher.run_dir).resolve()),
        method=cfg.teacher_solver,
        steps=None if cfg.teacher_solver == "dopri5" else (cfg.teacher_steps or 32),
        schedule=teacher.path.schedule,
    )
