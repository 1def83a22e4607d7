"""Run configurations: the ``RunConfig`` sections (data, model, path, objective, train) and the
named presets behind ``flowmatch train --preset NAME``.

A run is fully described by its ``RunConfig``: the command line starts from a preset and applies
``key=value`` overrides (``model.hidden=128``, ``train.lr=1e-3``; a section name alone sets its
``name``, so ``objective=lsd`` means ``objective.name=lsd``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from flowmatch.training.config import ConfigError, TrainConfig, apply_overrides

FLOW_MAP_OBJECTIVES = ("lsd", "esd", "psd-mid", "psd-uniform", "meanflow", "lmd", "emd", "pfmm")
ObjectiveName = Literal[
    "fm", "lsd", "esd", "psd-mid", "psd-uniform", "meanflow", "lmd", "emd", "pfmm", "reflow"
]


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from.

    ``name``: a 2-D toy (checkerboard, eight-gaussians, moons, rings, spirals, gmm), ``array``
    (the user's ``.npy``/``.pt`` file at ``path``), or an image set (digits, mnist,
    fashion-mnist, cifar10, folder; ``path`` is its directory, unused for digits).
    """

    name: str = "checkerboard"
    path: str | None = None
    val_fraction: float = 0.1
    conditional: bool = False  # image sets with labels: train a class-conditional model

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: an MLP for vector data or an ADM-style U-Net for images.

    A flow-map objective wraps it as ``x + (t - s) v(x, s, t)`` with two time inputs.
    """

    kind: Literal["mlp", "unet"] = "mlp"
    hidden: int = 256  # mlp
    depth: int = 4  # mlp
    activation: str = "silu"  # mlp
    channels: int = 32  # unet: base width
    channel_mult: tuple[int, ...] = (1, 2, 2)  # unet
    num_res_blocks: int = 1  # unet
    attention_resolutions: tuple[int, ...] = (7,)  # unet: image sizes with attention
    num_heads: int = 4  # unet
    num_head_channels: int | None = None  # unet: fixes the head width (ADM) when given
    num_groups: int = 8  # unet: GroupNorm groups
    dropout: float = 0.0  # unet
    init_from: str | None = None  # a run folder whose EMA weights start this network (to go on
    # training a finished run under a new schedule or objective); the networks must match


@dataclass(frozen=True)
class PathConfig:
    """The probability path, the coupling of noise and data, and the training-time density."""

    schedule: Literal["cond-ot", "cosine", "vp", "ve"] = "cond-ot"
    sigma_min: float = 0.0  # cond-ot
    coupling: Literal["independent", "exact-ot", "sinkhorn"] = "independent"
    ot_block_size: int | None = None  # exact-ot: pair blocks of this size (a fraction of the cost)
    time_sampler: Literal["uniform", "logit-normal"] = "uniform"


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the network learns.

    ``fm``: conditional flow matching of a velocity. Flow maps: self-distillation ``lsd`` /
    ``esd`` / ``psd-mid`` / ``psd-uniform``, ``meanflow``, or distillation from a teacher run
    (``lmd``, ``emd``, ``pfmm``; ``flowmatch distill --teacher RUN``). ``reflow`` retrains flow
    matching on (noise, sample) pairs of a teacher.
    """

    name: ObjectiveName = "fm"
    label_dropout: float = 0.1  # conditional models: share of null labels (guidance)
    diagonal_fraction: float = 0.75  # flow maps: share of the batch on the diagonal s = t
    learned_weight: bool = False  # flow maps: learned two-time weight e^-w L + w (unstable on
    # small runs here: it can favour the trivial self-consistent map; docs/flow-maps.md)
    both_orders: bool = False  # flow maps: train s > t too (backward map, few-step likelihood)
    teacher: str | None = None  # distillation / reflow: the teacher's run folder
    teacher_solver: str = "dopri5"  # reflow: how the teacher's pairs are generated
    teacher_steps: int | None = None
    reflow_pairs: int = 20000
    reflow_mode: Literal["flow_matching", "one_step"] = "flow_matching"  # one_step: distil
    teacher_guidance: float | None = None  # distillation: the teacher's guidance scale, so a
    # conditional flow map learns the guided flow (guidance itself acts on velocities only)
    warm_start: bool = False  # distil / reflow: start from the teacher's weights (a flow map at
    # its Euler step); flowmatch distill turns it on

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.diagonal_fraction < 1.0:
            raise ConfigError(f"diagonal_fraction must lie in [0, 1), got {self.diagonal_fraction}")
        for key in ("warm_start", "teacher_guidance"):
            if getattr(self, key) not in (None, False) and self.teacher is None:
                raise ConfigError(f"objective.{key} needs a teacher: use flowmatch distill")

    @property
    def is_flow_map(self) -> bool:
        return self.name in FLOW_MAP_OBJECTIVES


@dataclass(frozen=True)
class EvalConfig:
    """Defaults of ``flowmatch sample`` and ``flowmatch eval``."""

    samples: int = 4000  # 2-D: samples per metric
    solver: str = "dopri5"  # velocity runs; flow-map runs default to the flow map itself
    steps: int | None = None
    nll_samples: int = 1000


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    path: PathConfig = field(default_factory=PathConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def with_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """``apply_overrides`` with the shorthand ``section=value`` for ``section.name=value``."""
    sections_with_name = {
        f.name for f in dataclasses.fields(RunConfig) if hasattr(getattr(config, f.name), "name")
    }
    expanded = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in sections_with_name:
            item = f"{key.strip()}.name={value}"
        expanded.append(item)
    return apply_overrides(config, expanded)


def _toy(name: str, steps: int = 8000, **train: object) -> RunConfig:
    return RunConfig(
        data=DataConfig(name=name),
        eval=EvalConfig(samples=2000, nll_samples=500),
        train=TrainConfig(
            steps=steps,
            batch_size=512,
            lr=2e-3,
            warmup_steps=200,
            lr_schedule="cosine",
            ema_decay=0.995,
            log_every=100,
            checkpoint_every=2000,
            num_threads=1,  # small matrices: a second thread costs more than it brings
            **train,  # type: ignore[arg-type]
        ),
    )


def _flow_map(base: RunConfig, steps: int) -> RunConfig:
    return dataclasses.replace(
        base,
        objective=ObjectiveConfig(name="lsd"),
        train=dataclasses.replace(base.train, steps=steps, grad_clip=1.0),
    )


def _images(name: str, steps: int, conditional: bool = False) -> RunConfig:
    digits = name == "digits"
    return RunConfig(
        data=DataConfig(name=name, conditional=conditional),
        model=ModelConfig(
            kind="unet",
            channels=32,
            channel_mult=(1, 2) if digits else (1, 2, 2),
            attention_resolutions=(4,) if digits else (7,),
        ),
        eval=EvalConfig(samples=1000, solver="dopri5", nll_samples=200),
        train=TrainConfig(
            steps=steps,
            batch_size=64 if digits else 128,
            lr=1e-3 if digits else 5e-4,
            warmup_steps=100 if digits else 500,
            lr_schedule="cosine",
            grad_clip=1.0,
            ema_decay=0.999,
            log_every=50,
            checkpoint_every=500,
        ),
    )


def _small_unet(base: RunConfig) -> RunConfig:
    """``base`` on a U-Net cut for a CPU (16 channels at 28x28, 32 at 14x14, one residual block
    per level, no attention), trained at batch 64 with a higher learning rate."""
    return dataclasses.replace(
        base,
        model=dataclasses.replace(
            base.model,
            channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            num_groups=8,
        ),
        train=dataclasses.replace(
            base.train, batch_size=64, lr=1e-3, warmup_steps=200, num_threads=1
        ),
    )


@dataclass(frozen=True)
class Preset:
    description: str
    build: Callable[[], RunConfig]


PRESETS: dict[str, Preset] = {
    "checkerboard": Preset(
        "2-D checkerboard, MLP 4x256, CondOT flow matching, 8000 steps of 512 (1-2 min)",
        lambda: _toy("checkerboard"),
    ),
    "eight-gaussians": Preset(
        "2-D ring of eight Gaussians (exact density), MLP, flow matching, 8000 steps",
        lambda: _toy("eight-gaussians"),
    ),
    "moons": Preset("2-D two moons, MLP, flow matching, 8000 steps", lambda: _toy("moons")),
    "rings": Preset(
        "2-D concentric rings (exact density), MLP, flow matching, 8000 steps",
        lambda: _toy("rings"),
    ),
    "spirals": Preset("2-D spirals, MLP, flow matching, 8000 steps", lambda: _toy("spirals")),
    "gmm": Preset(
        "2-D Gaussian mixture with exact log-density (NLL against the truth), 8000 steps",
        lambda: _toy("gmm"),
    ),
    "checkerboard-ot": Preset(
        "checkerboard with minibatch exact-OT coupling (straighter paths, fewer steps)",
        lambda: dataclasses.replace(_toy("checkerboard"), path=PathConfig(coupling="exact-ot")),
    ),
    "checkerboard-flowmap": Preset(
        "checkerboard flow map by Lagrangian self-distillation: sample in 1, 2, 4... steps",
        lambda: _flow_map(_toy("checkerboard"), 8000),
    ),
    "eight-gaussians-flowmap": Preset(
        "eight Gaussians flow map by Lagrangian self-distillation",
        lambda: _flow_map(_toy("eight-gaussians"), 8000),
    ),
    "gmm-flowmap": Preset(
        "Gaussian-mixture flow map, trained on both time orders for few-step likelihood",
        lambda: dataclasses.replace(
            _flow_map(_toy("gmm"), 8000), objective=ObjectiveConfig(name="lsd", both_orders=True)
        ),
    ),
    "digits": Preset(
        "scikit-learn 8x8 digits (17 levels, bundled), small U-Net, 2000 steps",
        lambda: _images("digits", 2000),
    ),
    "mnist": Preset(
        "MNIST 28x28 (needs `flowmatch data fetch mnist`), U-Net 1.2M, 4000 steps of 128",
        lambda: _images("mnist", 4000),
    ),
    "mnist-small": Preset(
        "MNIST with a U-Net of 178k parameters for a CPU: 4000 steps of 64 (~17 min, 1 thread)",
        lambda: _small_unet(_images("mnist", 4000)),
    ),
    "mnist-conditional": Preset(
        "class-conditional MNIST with label dropout 0.1 for classifier-free guidance",
        lambda: _images("mnist", 4000, conditional=True),
    ),
    "fashion-mnist": Preset(
        "Fashion-MNIST 28x28 (needs `flowmatch data fetch fashion-mnist`), U-Net, 4000 steps",
        lambda: _images("fashion-mnist", 4000),
    ),
    "mnist-flowmap": Preset(
        "MNIST flow map by Lagrangian self-distillation (U-Net with two time inputs)",
        lambda: _flow_map(_images("mnist", 4000), 4000),
    ),
    "cifar10-paper": Preset(
        "the Flow Matching paper's CIFAR-10 recipe (U-Net 256 ch, batch 256, lr 5e-4, poly decay, "
        "45k warm-up, 391k steps on 2 GPUs); not runnable on a CPU",
        lambda: RunConfig(
            data=DataConfig(name="cifar10"),
            model=ModelConfig(
                kind="unet",
                channels=256,
                channel_mult=(1, 2, 2, 2),
                num_res_blocks=2,
                attention_resolutions=(16,),
                num_heads=4,
                num_head_channels=64,
                num_groups=32,
                dropout=0.0,
            ),
            eval=EvalConfig(samples=50000, solver="dopri5", nll_samples=10000),
            train=TrainConfig(
                steps=391_000,
                batch_size=256,
                lr=5e-4,
                warmup_steps=45_000,
                lr_schedule="poly",
                ema_decay=0.9999,
                log_every=100,
                checkpoint_every=5000,
            ),
        ),
    ),
}


def preset_config(name: str) -> RunConfig:
    """The ``RunConfig`` of a preset; ``ConfigError`` naming the presets for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].build()
