"""From a ``RunConfig`` to live objects, and back from a run folder.

This module owns the assembly of a run: its data source, network, path, coupling, time sampler
and objective (``build_*``), the ``spec.json`` that records what the network was built for, and
``load_run(RUN_DIR)``, which returns the trained network (EMA weights) ready for ``sample`` and
``log_likelihood``. ``export_run`` writes the weights as safetensors beside the config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from flowmatch.couplings import ExactOTCoupling, IndependentCoupling, SinkhornCoupling
from flowmatch.data import TOY_DATASETS, load_array_dataset
from flowmatch.data.images import IMAGE_SETS, ImageDataset, load_image_set
from flowmatch.losses import (
    FlowMatchingObjective,
    MapDistillationObjective,
    MeanFlowObjective,
    SelfDistillationObjective,
)
from flowmatch.nets import (
    MLP,
    FlowMapNet,
    GuidedVelocity,
    UNet,
    drop_labels,
    warm_start_from_velocity,
)
from flowmatch.paths import (
    SCHEDULES,
    AffinePath,
    CondOTSchedule,
    LogitNormalTimeSampler,
    UniformTimeSampler,
)
from flowmatch.presets import RunConfig
from flowmatch.reflow import ReflowObjective, ReflowPairs, cached_reflow_pairs
from flowmatch.training.checkpoint import (
    CheckpointError,
    config_differences,
    latest_checkpoint,
    load_checkpoint,
)
from flowmatch.training.config import ConfigError, config_from_dict, config_to_dict

SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class DataSpec:
    """What the network is built for: one item's shape, the label count and pixel levels."""

    shape: tuple[int, ...]
    num_classes: int | None = None  # set for class-conditional runs
    levels: int | None = None  # set for image data (bits/dim)

    def to_json(self) -> str:
        return json.dumps(
            {"shape": list(self.shape), "num_classes": self.num_classes, "levels": self.levels}
        )

    @classmethod
    def from_json(cls, text: str) -> DataSpec:
        d = json.loads(text)
        return cls(tuple(d["shape"]), d.get("num_classes"), d.get("levels"))


class LabelledSource:
    """Image batches as dicts ``{"x1", "y"}`` with labels dropped to the null label per sample
    with probability ``label_dropout`` (classifier-free guidance training)."""

    def __init__(self, images: ImageDataset, label_dropout: float, null_label: int) -> None:
        self.images = images
        self.label_dropout = label_dropout
        self.null_label = null_label
        self.shape = images.shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        batch = self.images.sample_labelled(n, generator)
        assert batch.label is not None
        y = drop_labels(batch.label, self.label_dropout, self.null_label, generator)
        return {"x1": batch.x1, "y": y}


@dataclass
class Data:
    """The training source, an optional validation source, the spec and, for 2-D toys, the
    target distribution itself (fresh samples and, where it exists, ``log_prob``)."""

    train: Any
    validation: Any | None
    spec: DataSpec
    target: Any | None = None


def build_data(config: RunConfig, device: torch.device | str = "cpu") -> Data:
    """The data of ``config.data``; ``ConfigError`` for an unknown name or a missing path."""
    cfg = config.data
    if cfg.name in TOY_DATASETS:
        target = TOY_DATASETS[cfg.name]()
        return Data(train=target, validation=None, spec=DataSpec(target.shape), target=target)
    if cfg.name == "array":
        if cfg.path is None:
            raise ConfigError("data.name=array needs data.path=FILE (.npy or .pt)")
        split = load_array_dataset(cfg.path, val_fraction=cfg.val_fraction)
        return Data(split.train, split.validation, DataSpec(split.train.shape))
    if cfg.name in IMAGE_SETS:
        images = ImageDataset(load_image_set(cfg.name, cfg.path, "train"), device=device)
        spec = DataSpec(images.shape, levels=images.levels)
        if not cfg.conditional:
            return Data(images, None, spec)
        if images.labels is None:
            raise ConfigError(f"data.conditional=true, but the {cfg.name} set has no labels")
        num_classes = int(images.labels.max()) + 1
        source = LabelledSource(images, config.objective.label_dropout, num_classes)
        return Data(source, None, DataSpec(images.shape, num_classes, images.levels))
    raise ConfigError(
        f"unknown data.name {cfg.name!r}; choose one of {', '.join(TOY_DATASETS)}, array, "
        f"{', '.join(IMAGE_SETS)}"
    )


def build_model(config: RunConfig, spec: DataSpec) -> nn.Module:
    """The network of ``config.model`` for data ``spec``: a velocity field, or a flow map
    ``x + (t - s) v(x, s, t)`` when the objective learns one."""
    cfg = config.model
    num_times = 2 if config.objective.is_flow_map else 1
    if cfg.kind == "mlp":
        if len(spec.shape) != 1:
            raise ConfigError(
                f"model.kind=mlp needs vector data, got items of shape {list(spec.shape)}; "
                "use model.kind=unet for images"
            )
        net: nn.Module = MLP(
            spec.shape[0],
            hidden=cfg.hidden,
            depth=cfg.depth,
            activation=cfg.activation,
            num_classes=spec.num_classes,
            num_times=num_times,
        )
    else:
        if len(spec.shape) != 3 or spec.shape[1] != spec.shape[2]:
            raise ConfigError(
                f"model.kind=unet needs square images [C, H, H], got {list(spec.shape)}"
            )
        net = UNet(
            in_channels=spec.shape[0],
            model_channels=cfg.channels,
            channel_mult=cfg.channel_mult,
            num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=cfg.attention_resolutions,
            num_heads=cfg.num_heads,
            num_head_channels=cfg.num_head_channels,
            dropout=cfg.dropout,
            num_classes=spec.num_classes,
            image_size=spec.shape[1],
            num_groups=cfg.num_groups,
            num_times=num_times,
        )
    return FlowMapNet(net) if num_times == 2 else net


def build_path(config: RunConfig) -> AffinePath:
    cfg = config.path
    if cfg.schedule == "cond-ot":
        return AffinePath(CondOTSchedule(sigma_min=cfg.sigma_min))
    return AffinePath(SCHEDULES[cfg.schedule]())


def build_coupling(config: RunConfig) -> Callable[..., Tensor]:
    cfg = config.path
    if cfg.coupling == "exact-ot":
        return ExactOTCoupling(block_size=cfg.ot_block_size)
    return SinkhornCoupling() if cfg.coupling == "sinkhorn" else IndependentCoupling()


def build_time_sampler(config: RunConfig) -> Callable[..., Tensor]:
    schedule = build_path(config).schedule
    if config.path.time_sampler == "logit-normal":
        return LogitNormalTimeSampler(t_min=schedule.t_min, t_max=schedule.t_max)
    return UniformTimeSampler(schedule.t_min, schedule.t_max)


def build_objective(config: RunConfig, teacher: Callable[..., Tensor] | None = None) -> Any:
    """The training objective of ``config.objective``; distillation needs the ``teacher``
    velocity (see :func:`load_teacher`)."""
    cfg, path = config.objective, build_path(config)
    if cfg.name == "fm":
        return FlowMatchingObjective(
            path, coupling=build_coupling(config), time_sampler=build_time_sampler(config)
        )
    if cfg.name in ("lsd", "esd", "psd-mid", "psd-uniform"):
        return SelfDistillationObjective(
            path,
            kind=cfg.name,
            diagonal_fraction=cfg.diagonal_fraction,
            learned_weight=cfg.learned_weight,
            both_orders=cfg.both_orders,
        )
    if cfg.name == "meanflow":
        return MeanFlowObjective(path)
    if cfg.name == "reflow":
        return ReflowObjective(path, mode=cfg.reflow_mode, time_sampler=build_time_sampler(config))
    if teacher is None:
        raise ConfigError(f"objective {cfg.name} distils a teacher: use flowmatch distill")
    return MapDistillationObjective(
        path,
        teacher,
        kind=cfg.name,
        learned_weight=cfg.learned_weight,  # type: ignore[arg-type]
    )


def load_teacher(config: RunConfig) -> Run:
    """The teacher run named by ``objective.teacher``."""
    if config.objective.teacher is None:
        raise ConfigError(f"objective {config.objective.name} needs objective.teacher=RUN_DIR")
    return load_run(config.objective.teacher)


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
    """Copy the EMA weights of the run in ``run_dir`` (its last checkpoint) into ``model``."""
    theirs, ours = load_run(run_dir).model.state_dict(), model.state_dict()

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


def reflow_source(config: RunConfig, teacher: Run, run_dir: str | Path) -> ReflowPairs:
    """The teacher's (noise, sample) pairs, generated once from ``train.seed`` and cached in
    ``run_dir/reflow-pairs``."""
    cfg = config.objective
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return cached_reflow_pairs(
        Path(run_dir) / "reflow-pairs",
        teacher.velocity(),
        cfg.reflow_pairs,
        teacher.spec.shape,
        seed=config.train.seed,
        teacher_id=str(Path(teacher.run_dir).resolve()),
        method=cfg.teacher_solver,
        steps=None if cfg.teacher_solver == "dopri5" else (cfg.teacher_steps or 32),
        schedule=teacher.path.schedule,
    )


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
    def is_flow_map(self) -> bool:
        return self.config.objective.is_flow_map

    def velocity(self, guidance_scale: float | None = None) -> Callable[..., Tensor]:
        """The velocity field to integrate: the network, its diagonal for a flow map, and the
        guided combination of both label branches when ``guidance_scale`` is given."""
        field = self.model.velocity if self.is_flow_map else self.model
        if guidance_scale is None:
            return field
        if self.spec.num_classes is None:
            raise ConfigError("--guidance needs a class-conditional run")
        return GuidedVelocity(field, guidance_scale, null_label=self.spec.num_classes)

    def source(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws from the path's source distribution, shaped like the data."""
        return self.path.schedule.sample_source((n, *self.spec.shape), generator=generator)


def read_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a flowmatch run folder (no config.json)")
    try:
        return config_from_dict(RunConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, ConfigError) as error:
        raise CheckpointError(f"{path} is not a valid run config: {error}") from None


def write_spec(run_dir: str | Path, spec: DataSpec) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / SPEC_FILE).write_text(spec.to_json() + "\n")


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Run:
    """The run in ``run_dir`` at its last checkpoint (or ``checkpoint``), EMA weights, on CPU.

    Raises ``CheckpointError`` (one line) for a folder that is not a run, or a checkpoint that is
    corrupt, foreign or written with another config.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    spec_path = run_dir / SPEC_FILE
    if not spec_path.exists():
        raise CheckpointError(f"{run_dir} has no {SPEC_FILE}; was it written by flowmatch train?")
    spec = DataSpec.from_json(spec_path.read_text())
    path = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet")
    state = load_checkpoint(path)
    # Keys added to the config since the checkpoint was written take their defaults; training
    # and evaluation settings may change over a run's life, the rest defines it.
    expected = config_to_dict(config)
    try:
        stored = config_to_dict(config_from_dict(RunConfig, state.config))
    except ConfigError as error:
        raise CheckpointError(f"{path} holds a config this version cannot read: {error}") from None
    free = tuple(f"{section}.{key}" for section in ("train", "eval") for key in expected[section])
    differences = config_differences(stored, expected, free)
    if differences:
        raise CheckpointError(f"{path} was written with another config: {'; '.join(differences)}")
    model = build_model(config, spec)
    try:
        model.load_state_dict(state.ema)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{path} does not fit the run's network: {first}") from None
    model.eval().requires_grad_(False)
    return Run(run_dir, config, spec, model, build_path(config), state.step)


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (EMA weights), ``config.json`` and ``spec.json`` to
    ``out_dir``; returns the weights' path."""
    run = load_run(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    state = {k: v.contiguous() for k, v in run.model.state_dict().items()}
    safetensors.torch.save_file(state, str(weights), metadata={"step": str(run.step)})
    (out / "config.json").write_text(json.dumps(config_to_dict(run.config), indent=2) + "\n")
    write_spec(out, run.spec)
    return weights
