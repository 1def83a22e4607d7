"""From a ``RunConfig`` to live objects: the data source, network, path, coupling and time
sampler of a run, and the ``DataSpec`` that records what its network was built for."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowmatch.app.config import RunConfig
from flowmatch.app.objectives import OBJECTIVES, Parts
from flowmatch.couplings import ExactOTCoupling, IndependentCoupling, SinkhornCoupling
from flowmatch.data import TOY_DATASETS, load_array_dataset
from flowmatch.data.contextual import CONTEXT_DATASETS, ContextSource, load_context_arrays
from flowmatch.data.images import (
    IMAGE_SETS,
    ImageDataset,
    StreamingImageFolder,
    load_image_set,
)
from flowmatch.nets import MLP, FlatItems, FlowMapNet, UNet, drop_context, drop_labels
from flowmatch.paths import (
    SCHEDULES,
    AffinePath,
    CondOTSchedule,
    LogitNormalTimeSampler,
    UniformTimeSampler,
)
from flowmatch.training.config import ConfigError


@dataclass(frozen=True)
class DataSpec:
    """What the network is built for: one item's shape, the label count, pixel levels and the
    context size."""

    shape: tuple[int, ...]
    num_classes: int | None = None  # set for class-conditional runs
    levels: int | None = None  # set for image data (bits/dim)
    context_dim: int | None = None  # set for runs conditioned on a context vector

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "num_classes": self.num_classes,
            "levels": self.levels,
            "context_dim": self.context_dim,
        }

    @classmethod
    def from_dict(cls, d: Any) -> DataSpec:
        """The spec in ``d``; ``ValueError`` (one line) for anything else."""
        if not isinstance(d, dict) or not isinstance(d.get("shape"), list):
            raise ValueError("a data spec is a mapping with a 'shape' list")
        shape, classes, levels = d["shape"], d.get("num_classes"), d.get("levels")
        if not shape or not all(type(n) is int and 1 <= n <= 1 << 20 for n in shape):
            raise ValueError(f"shape must be a list of positive sizes, got {shape!r}")
        for name, value in (("num_classes", classes), ("levels", levels)):
            if value is not None and not (type(value) is int and 2 <= value <= 1 << 20):
                raise ValueError(f"{name} must be an integer >= 2 or null, got {value!r}")
        context_dim = d.get("context_dim")
        if context_dim is not None and not (type(context_dim) is int and 1 <= context_dim <= 4096):
            raise ValueError(
                f"context_dim must be an integer in 1..4096 or null, got {context_dim!r}"
            )
        return cls(tuple(shape), classes, levels, context_dim)


class LabelledSource:
    """Image batches as dicts ``{"x1", "y"}`` with labels dropped to the null label per sample
    with probability ``label_dropout`` (classifier-free guidance training)."""

    def __init__(
        self,
        images: ImageDataset | StreamingImageFolder,
        label_dropout: float,
        null_label: int,
    ) -> None:
        self.images = images
        self.label_dropout = label_dropout
        self.null_label = null_label
        self.shape = images.shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        batch = self.images.sample_labelled(n, generator)
        assert batch.label is not None
        y = drop_labels(batch.label, self.label_dropout, self.null_label, generator)
        return {"x1": batch.x1, "y": y}


class ContextImages:
    """Image batches as dicts ``{"x1", "context"}`` with each context dropped to NaN with
    probability ``dropout`` (classifier-free guidance training)."""

    def __init__(self, images: ImageDataset | StreamingImageFolder, dropout: float) -> None:
        self.images = images
        self.dropout = dropout
        self.shape = images.shape

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        batch = self.images.sample_labelled(n, generator)
        assert batch.context is not None
        return {"x1": batch.x1, "context": drop_context(batch.context, self.dropout, generator)}


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
    if cfg.name in CONTEXT_DATASETS:
        context_target = CONTEXT_DATASETS[cfg.name]()
        contexts = ContextSource(context_target, config.objective.label_dropout)
        spec = DataSpec(context_target.shape, context_dim=context_target.context_dim)
        return Data(train=contexts, validation=None, spec=spec, target=context_target)
    if cfg.name == "array":
        if cfg.path is None:
            raise ConfigError("data.name=array needs data.path=FILE (.npy or .pt)")
        if cfg.context_path is not None:
            train, validation = load_context_arrays(
                cfg.path, cfg.context_path, cfg.val_fraction, config.objective.label_dropout
            )
            return Data(train, validation, DataSpec(train.shape, context_dim=train.context_dim))
        split = load_array_dataset(cfg.path, val_fraction=cfg.val_fraction)
        return Data(split.train, split.validation, DataSpec(split.train.shape))
    if cfg.name in IMAGE_SETS:
        if cfg.path is None and cfg.name != "digits":
            raise ConfigError(f"data.name={cfg.name} needs data.path=DIR (its folder of files)")
        images: ImageDataset | StreamingImageFolder
        if cfg.stream:  # the batches come back on the CPU: the loop moves them
            assert cfg.path is not None
            images = StreamingImageFolder(
                cfg.path,
                "train",
                cfg.test_fraction,
                workers=cfg.workers,
                context_path=cfg.context_path,
            )
        else:
            train_images = load_image_set(
                cfg.name, cfg.path, "train", cfg.test_fraction, cfg.context_path
            )
            images = ImageDataset(train_images, device=device)
        if images.contexts is not None:
            dim = images.contexts.shape[1]
            spec = DataSpec(images.shape, levels=images.levels, context_dim=dim)
            return Data(ContextImages(images, config.objective.label_dropout), None, spec)
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
    num_times = 2 if OBJECTIVES[config.objective.name].is_flow_map else 1
    time_scale = default_time_scale(config) if cfg.time_scale is None else cfg.time_scale
    if cfg.kind == "mlp":  # items of several axes: an MLP over their flattened dimensions
        net: nn.Module = MLP(
            math.prod(spec.shape),
            hidden=cfg.hidden,
            depth=cfg.depth,
            activation=cfg.activation,
            num_classes=spec.num_classes,
            num_times=num_times,
            context_dim=spec.context_dim,
            time_scale=time_scale,
        )
        if len(spec.shape) != 1:
            net = FlatItems(net, spec.shape)
    else:
        if len(spec.shape) != 3 or spec.shape[1] != spec.shape[2]:
            raise ConfigError(
                f"model.kind=unet needs square images [C, H, H], got {list(spec.shape)}"
            )
        _check_unet_levels(cfg.channel_mult, cfg.attention_resolutions, spec.shape[1])
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
            context_dim=spec.context_dim,
            time_scale=time_scale,
        )
    return FlowMapNet(net) if num_times == 2 else net


def default_time_scale(config: RunConfig) -> float:
    """The time-embedding scale of a network whose ``model.time_scale`` is unset: 1 for a flow
    map, whose objectives differentiate the network in time (its time derivative grows with the
    scale: with 1000, MeanFlow's target is dominated by the fastest features; cf. Lu & Song
    2024, Sec. 4.1, on time embeddings in continuous-time consistency training), and 1000, the
    ADM convention, for a velocity field; an objective's registry entry may set its own."""
    entry = OBJECTIVES[config.objective.name]
    if entry.time_scale is not None:
        return entry.time_scale
    return 1.0 if entry.is_flow_map else 1000.0


def _check_unet_levels(
    channel_mult: tuple[int, ...], attention: tuple[int, ...], size: int
) -> None:
    """``ConfigError`` naming the key to set when the U-Net's levels do not fit ``size x size``
    images (a preset made for another image size)."""
    levels = len(channel_mult)
    if size % 2 ** (levels - 1):
        raise ConfigError(
            f"{size}x{size} images do not halve {levels - 1} times (model.channel_mult has "
            f"{levels} levels): set model.channel_mult with fewer levels, e.g. 1,2"
        )
    resolutions = [size // 2**level for level in range(levels)]
    unknown = sorted(set(attention) - set(resolutions))
    if unknown:
        choices = ",".join(map(str, resolutions[1:] or resolutions))
        raise ConfigError(
            f"model.attention_resolutions {list(unknown)} are not among the U-Net's resolutions "
            f"{resolutions} for {size}x{size} images: set model.attention_resolutions to some of "
            f"{choices} (or model.attention_resolutions= for none)"
        )


def build_path(config: RunConfig) -> AffinePath:
    cfg = config.path
    if cfg.schedule == "cond-ot":
        return AffinePath(CondOTSchedule(sigma_min=cfg.sigma_min))
    return AffinePath(SCHEDULES[cfg.schedule]())


def build_coupling(config: RunConfig) -> Callable[..., Tensor]:
    cfg = config.path
    if cfg.coupling == "exact-ot":
        return ExactOTCoupling(
            block_size=cfg.ot_block_size,
            condition_weight=cfg.condition_weight,
            blocks=cfg.ot_blocks,
        )
    if cfg.coupling == "sinkhorn":
        return SinkhornCoupling(condition_weight=cfg.condition_weight)
    return IndependentCoupling()


def build_time_sampler(config: RunConfig) -> Callable[..., Tensor]:
    schedule = build_path(config).schedule
    if config.path.time_sampler == "logit-normal":
        return LogitNormalTimeSampler(t_min=schedule.t_min, t_max=schedule.t_max)
    return UniformTimeSampler(schedule.t_min, schedule.t_max)


def build_objective(config: RunConfig, teacher: Callable[..., Tensor] | None = None) -> Any:
    """The training objective of ``config.objective``, by its registry entry; a distillation
    needs the ``teacher`` velocity."""
    entry = OBJECTIVES[config.objective.name]
    if entry.teacher and not entry.trains_on_teacher_pairs and teacher is None:
        raise ConfigError(f"objective {config.objective.name} distils a teacher: pass its velocity")
    parts = Parts(
        config, build_path(config), build_coupling(config), build_time_sampler(config), teacher
    )
    objective = entry.build(parts)
    if entry.is_flow_map:  # it pairs its own noise with the data, condition-aware as configured
        objective.coupling = parts.coupling
        objective.condition_aware = config.path.condition_aware
    return objective
