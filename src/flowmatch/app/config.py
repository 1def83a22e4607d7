"""The run config schema: the ``RunConfig`` sections (data, model, path, objective, eval, train)
with every key's type and range, the ``key=value`` override parser and config files.

A run is fully described by its ``RunConfig``; the command line starts from a preset or a config
file (a run's own ``config.json`` is one) and applies ``key=value`` overrides
(``model.hidden=128``, ``train.lr=1e-3``; a section name alone sets its ``name``, so
``objective=lsd`` means ``objective.name=lsd``). Every bad value is a ``ConfigError`` with one
line naming the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from flowmatch.data import IMAGE_SETS, TOY_DATASETS
from flowmatch.data.contextual import CONTEXT_DATASETS
from flowmatch.nets.mlp import ACTIVATIONS
from flowmatch.paths import Schedule
from flowmatch.solvers import METHODS, ConstantDiffusion, VanishingDiffusion
from flowmatch.training.config import (
    MAX_BATCH,
    MAX_SEED,
    RESUMABLE,
    ConfigError,
    TrainConfig,
    apply_overrides,
    check_range,
    config_from_dict,
)
from flowmatch.training.files import RunFileError, read_text

MAX_WIDTH = 1 << 16  # hidden units or channels: far beyond any network trained here
ODE_SOLVERS = tuple(m for m in METHODS if m not in ("flow_map", "euler_maruyama"))
SOLVERS = (*ODE_SOLVERS, "euler_maruyama", "flow_map")  # the last two sample stochastically too


def _check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_sizes(name: str, values: tuple[int, ...], low: int, high: int) -> None:
    for value in values:
        check_range(name, value, low, high)


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from.

    ``name``: a 2-D toy (checkerboard, eight-gaussians, moons, rings, spirals, gmm), a 2-D toy
    with a context per sample (gaussian-context: ``x | c ~ N(c, 0.25^2 I)``), ``array`` (the
    user's ``.npy``/``.pt`` file ``[N, *dims]`` at ``path``), or an image set (digits, mnist,
    fashion-mnist, cifar10, folder; ``path`` is its directory, unused for digits). A ``folder``
    holds PNG/JPEG files of one size, directly (unlabelled) or in one sub-folder per class; its
    test split is a seeded permutation of the sorted file paths. ``stream=true`` reads a
    folder's files from disk as training draws them (``workers`` DataLoader processes decode
    them; 0: the training process), for folders larger than memory; the batches are those of
    the folder loaded into memory.

    ``context_path`` conditions on a context vector per sample: for ``array`` a second file
    ``[N, C]``, for a ``folder`` a table with one row per image file, a ``.csv`` (a header row,
    then the file's path relative to the folder and its C numbers: ``a/img_001.png,0.5,1.2``)
    or a ``.json`` object (``{"a/img_001.png": [0.5, 1.2]}``; a number for C = 1). Every file
    needs exactly one row; the contexts follow their images through the test split and
    streaming. A folder run conditions on contexts or on class labels, not both.
    """

    name: str = "checkerboard"
    path: str | None = None
    val_fraction: float = 0.1  # array: share of the rows held out (validation loss and eval)
    test_fraction: float = 0.1  # folder: share of the files held out for flowmatch eval
    conditional: bool = False  # image sets with labels: train a class-conditional model
    context_path: str | None = None  # array: a file [N, C]; folder: a .csv/.json per file
    # folder: decode the files as they are drawn instead of loading them (same batches)
    stream: bool = field(default=False, metadata={RESUMABLE: True})
    # stream: DataLoader processes that decode (0: the training process)
    workers: int = field(default=0, metadata={RESUMABLE: True})

    def __post_init__(self) -> None:
        names = [*TOY_DATASETS, *CONTEXT_DATASETS, "array", *IMAGE_SETS]
        _check_choice("name", self.name, names)
        check_range("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        check_range("test_fraction", self.test_fraction, 0.0, 1.0, high_open=True)
        reads_files = self.name == "array" or (self.name in IMAGE_SETS and self.name != "digits")
        if self.path is not None and not reads_files:
            raise ConfigError(f"path does not apply to name={self.name} (it ships with flowmatch)")
        if self.context_path is not None and self.name not in ("array", "folder"):
            raise ConfigError(
                f"context_path applies to name=array or name=folder, not name={self.name}"
            )
        check_range("workers", self.workers, 0, 256)
        if self.stream and self.name != "folder":
            raise ConfigError(
                f"stream=true reads a folder of images (name=folder), not {self.name}"
            )
        if self.workers and not self.stream:
            raise ConfigError("workers decode a streamed folder: set data.stream=true with it")
        if self.conditional and self.name not in IMAGE_SETS:
            raise ConfigError(
                f"conditional=true needs a labelled image set; {self.name} has no labels"
            )
        if self.conditional and self.context_path is not None:
            raise ConfigError(
                "conditional=true (class labels) and context_path (contexts) are alternatives: "
                "condition on one"
            )


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
    # the sinusoidal time embedding's scale a (features sin(a f_k t)); unset: 1 for a flow map,
    # 1000 for a velocity field, the teacher's for a warm-started distillation (config.json
    # records the number). Time derivatives of the map scale with a: see docs/flow-maps.md.
    time_scale: float | None = None
    init_from: str | None = None  # a run folder whose EMA weights start this network (to go on
    # training a finished run under a new schedule or objective); the networks must match

    def __post_init__(self) -> None:
        check_range("hidden", self.hidden, 1, MAX_WIDTH)
        check_range("depth", self.depth, 1, 256)
        _check_choice("activation", self.activation, list(ACTIVATIONS))
        check_range("channels", self.channels, 1, MAX_WIDTH)
        if not self.channel_mult:
            raise ConfigError("channel_mult needs at least one level, e.g. 1,2,2")
        _check_sizes("channel_mult", self.channel_mult, 1, 64)
        check_range("num_res_blocks", self.num_res_blocks, 1, 64)
        _check_sizes("attention_resolutions", self.attention_resolutions, 1, MAX_WIDTH)
        check_range("num_heads", self.num_heads, 1, MAX_WIDTH)
        check_range("num_head_channels", self.num_head_channels, 1, MAX_WIDTH, optional=True)
        check_range("num_groups", self.num_groups, 1, MAX_WIDTH)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_range("time_scale", self.time_scale, 0.0, 1e6, low_open=True, optional=True)
        if self.kind == "unet":
            for width in (self.channels * m for m in self.channel_mult):
                if width % self.num_groups:
                    raise ConfigError(
                        f"num_groups {self.num_groups} must divide every level's channels "
                        f"(channels x channel_mult: {width})"
                    )
                heads = self.num_head_channels or width // self.num_heads
                if width % self.num_heads and self.num_head_channels is None:
                    raise ConfigError(
                        f"num_heads {self.num_heads} must divide every level's channels ({width})"
                    )
                if width % heads:
                    raise ConfigError(
                        f"num_head_channels {heads} must divide every level's channels ({width})"
                    )


@dataclass(frozen=True)
class PathConfig:
    """The probability path, the coupling of noise and data, and the training-time density."""

    schedule: Literal["cond-ot", "cosine", "vp", "ve"] = "cond-ot"
    sigma_min: float = 0.0  # cond-ot
    coupling: Literal["independent", "exact-ot", "sinkhorn"] = "independent"
    ot_block_size: int | None = None  # exact-ot: pair blocks of this size (a fraction of the cost)
    # exact-ot blocks: consecutive slices of the batch, or sorted (noise and data blocks of
    # corresponding regions: plans closer to the whole batch's)
    ot_blocks: Literal["consecutive", "sorted"] = "consecutive"
    time_sampler: Literal["uniform", "logit-normal"] = "uniform"
    condition_aware: bool = True  # OT couplings on labelled / context data pair within
    # conditions (C2OT); false: plain OT, which ignores them
    condition_weight: float = 1.0  # OT on context data: weight of |c_i - c_j|^2 in the cost

    def __post_init__(self) -> None:
        check_range("sigma_min", self.sigma_min, 0.0, 1.0, high_open=True)
        if self.sigma_min != 0.0 and self.schedule != "cond-ot":
            raise ConfigError(f"sigma_min applies to schedule=cond-ot, not {self.schedule}")
        check_range("ot_block_size", self.ot_block_size, 1, MAX_BATCH, optional=True)
        if self.ot_block_size is not None and self.coupling != "exact-ot":
            raise ConfigError(f"ot_block_size applies to coupling=exact-ot, not {self.coupling}")
        if self.ot_blocks != "consecutive" and self.ot_block_size is None:
            raise ConfigError("ot_blocks applies to block-wise exact OT: set path.ot_block_size")
        check_range("condition_weight", self.condition_weight, 0.0, 1e12)
        defaults = (("condition_aware", True), ("condition_weight", 1.0))
        changed = [key for key, default in defaults if getattr(self, key) != default]
        if changed and self.coupling == "independent":
            raise ConfigError(f"{changed[0]} applies to the OT couplings, not coupling=independent")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the network learns: ``name`` is an entry of the objective registry
    (:data:`flowmatch.app.objectives.OBJECTIVES`; ``flowmatch train --help`` lists them).

    ``fm``: conditional flow matching of a velocity. Flow maps: self-distillation ``lsd`` /
    ``esd`` / ``psd-mid`` / ``psd-uniform``, ``meanflow``, or distillation from a teacher run
    (``lmd``, ``emd``, ``pfmm``; ``flowmatch distill --teacher RUN``). ``reflow`` retrains flow
    matching on (noise, sample) pairs of a teacher.
    """

    name: str = "fm"
    label_dropout: float = 0.1  # conditional models: share of null labels or contexts (guidance)
    # Keys that only some objectives read (ObjectiveEntry.settings; the others refuse a change):
    diagonal_fraction: float = 0.75  # self-distillation: share of the batch on the diagonal
    learned_weight: bool = False  # flow maps but the MeanFlows and TVM: the learned two-time
    # weight e^-w L + w (unstable on small runs here: it can favour the trivial
    # self-consistent map; docs/flow-maps.md)
    both_orders: bool = False  # self-distillation: train s > t too (backward map, few-step
    # likelihood)
    teacher: str | None = None  # distillation / reflow: the teacher's run folder
    teacher_solver: str = "dopri5"  # reflow: how the teacher's pairs are generated
    teacher_steps: int | None = None
    reflow_pairs: int = 20000
    reflow_mode: Literal["flow_matching", "one_step"] = "flow_matching"  # one_step: distil
    teacher_guidance: float | None = None  # distillation: the teacher's guidance scale, so a
    # conditional flow map learns the guided flow (guidance itself acts on velocities only)
    warm_start: bool = False  # distil / reflow: start from the teacher's weights (a flow map at
    # its Euler step); flowmatch distill turns it on
    time_derivative: Literal["jvp", "finite_difference"] | None = None  # flow maps: how d/dt
    # of the map is taken; unset: the objective's (lsd: finite_difference, two calls instead of
    # a JVP; the rest: jvp), and jvp under train.precision=bf16
    target_ema: float | None = None  # tvm: EMA rate of the copy that gives the terminal
    # target; unset: the objective's (tvm: 0.99, the official code's); 0: the current parameters
    adaptive_power: float = 0.0  # meanflow, imf, alpha-flow: power p of the weight
    # 1 / (|r|^2 + eps)^p. The papers' p = 1 makes the loss |r| and the diagonal regress the
    # conditional velocity's geometric median, not its mean (a biased velocity: docs/flow-maps.md)

    def __post_init__(self) -> None:
        from flowmatch.app.objectives import (  # the registry builds from this schema
            OBJECTIVES,
            OPTIONAL_SETTINGS,
        )

        _check_choice("name", self.name, list(OBJECTIVES))
        check_range("label_dropout", self.label_dropout, 0.0, 1.0, high_open=True)
        check_range("diagonal_fraction", self.diagonal_fraction, 0.0, 1.0, high_open=True)
        _check_choice("teacher_solver", self.teacher_solver, ODE_SOLVERS)
        check_range("teacher_steps", self.teacher_steps, 1, 1 << 20, optional=True)
        check_range("reflow_pairs", self.reflow_pairs, 1, 1 << 27)
        check_range("adaptive_power", self.adaptive_power, 0.0, 4.0)
        check_range("target_ema", self.target_ema, 0.0, 1.0, high_open=True, optional=True)
        if self.target_ema is not None and OBJECTIVES[self.name].target_ema is None:
            takes = ", ".join(n for n, e in OBJECTIVES.items() if e.target_ema is not None)
            raise ConfigError(f"target_ema applies to objective={takes}, not to name={self.name}")
        defaults = {f.name: f.default for f in fields(self)}
        for key in OPTIONAL_SETTINGS:
            if getattr(self, key) != defaults[key] and key not in OBJECTIVES[self.name].settings:
                takes = ", ".join(n for n, e in OBJECTIVES.items() if key in e.settings)
                default = str(defaults[key]).lower()
                raise ConfigError(
                    f"{key} applies to objective={takes}, not to name={self.name}: set it to "
                    f"{default}"
                )
        guidance = self.teacher_guidance
        check_range("teacher_guidance", guidance, -math.inf, math.inf, optional=True)
        needs_teacher = OBJECTIVES[self.name].teacher
        if needs_teacher and self.teacher is None:
            raise ConfigError(
                f"name={self.name} distils a teacher: use flowmatch distill --teacher RUN"
            )
        if not needs_teacher:
            for key in ("teacher", "warm_start", "teacher_guidance"):
                if getattr(self, key) not in (None, False):
                    raise ConfigError(
                        f"{key} applies to distillation (flowmatch distill), not to "
                        f"name={self.name}"
                    )


@dataclass(frozen=True)
class EvalConfig:
    """Defaults of ``flowmatch sample`` and ``flowmatch eval``."""

    samples: int = 4000  # 2-D: samples per metric
    solver: str = "dopri5"  # velocity runs; flow-map runs default to the flow map itself
    steps: int | None = None
    nll_samples: int = 1000

    def __post_init__(self) -> None:
        check_range("samples", self.samples, 2, 1 << 24)
        _check_choice("solver", self.solver, ODE_SOLVERS)
        check_range("steps", self.steps, 1, 1 << 20, optional=True)
        check_range("nll_samples", self.nll_samples, 2, 1 << 24)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as ``config.json`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    path: PathConfig = field(default_factory=PathConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        from flowmatch.app.objectives import OBJECTIVES

        entry = OBJECTIVES[self.objective.name]
        if self.path.coupling != "independent" and not entry.uses_coupling:
            raise ConfigError(
                f"path.coupling={self.path.coupling} applies to objectives that pair noise with "
                f"data themselves ({', '.join(n for n, e in OBJECTIVES.items() if e.uses_coupling)}"
                f"), not to objective={self.objective.name}"
            )
        if self.objective.target_ema and self.train.parallel == "fsdp":
            raise ConfigError(
                f"objective.target_ema={self.objective.target_ema} keeps a whole copy of the "
                "network on each process: use train.parallel=ddp, or objective.target_ema=0 "
                "(the current parameters as the target)"
            )
        if self.objective.time_derivative == "finite_difference" and self.train.precision == "bf16":
            raise ConfigError(
                "objective.time_derivative=finite_difference subtracts two outputs 2e-3 apart in "
                "time, below bf16's resolution (3.9e-3 relative): use train.precision=fp32 or "
                "objective.time_derivative=jvp"
            )
        image = self.data.name in IMAGE_SETS
        if (self.model.kind == "unet") != image:
            want = "unet" if image else "mlp"
            raise ConfigError(
                f"model.kind={self.model.kind} does not fit data.name={self.data.name}: "
                f"use model.kind={want}"
            )
        check_range("train.seed", self.train.seed, 0, MAX_SEED)


DIFFUSION_SCHEDULES = {"constant": ConstantDiffusion, "vanishing": VanishingDiffusion}


@dataclass(frozen=True)
class SamplerNoise:
    """The noise of the stochastic samplers (see ``flowmatch.solvers.sde``): ``diffusion`` is the
    scale of ``eps_t`` and ``diffusion_schedule`` its shape for ``euler_maruyama`` (defaults 1.0
    and ``vanishing``, ``eps_t = 4 scale t (1 - t)``); ``gamma`` in [0, 1] re-noises between the
    jumps of ``flow_map``. ``None`` everywhere: the deterministic samplers."""

    diffusion: float | None = None
    diffusion_schedule: str | None = None
    gamma: float | None = None

    def check(self, method: str) -> None:
        """``ConfigError`` for values out of range or options that do not apply to ``method``."""
        if method != "euler_maruyama":
            for flag, value in (
                ("--diffusion", self.diffusion),
                ("--diffusion-schedule", self.diffusion_schedule),
            ):
                if value is not None:
                    raise ConfigError(f"{flag} applies to --solver euler_maruyama, not {method}")
        scale = self.diffusion
        if scale is not None and not (math.isfinite(scale) and scale >= 0):
            raise ConfigError(f"--diffusion must be a finite number >= 0, got {self.diffusion}")
        schedule = self.diffusion_schedule
        if schedule is not None and schedule not in DIFFUSION_SCHEDULES:
            raise ConfigError(
                f"--diffusion-schedule must be one of {', '.join(DIFFUSION_SCHEDULES)}, "
                f"got {schedule!r}"
            )
        if self.gamma is not None:
            if method != "flow_map":
                raise ConfigError(f"--gamma applies to --solver flow_map, not {method}")
            if not 0.0 <= self.gamma <= 1.0:
                raise ConfigError(f"--gamma must lie in [0, 1], got {self.gamma}")

    def integrate_kwargs(
        self, schedule: Schedule, method: str, generator: torch.Generator
    ) -> dict[str, Any]:
        """The stochastic keywords of ``integrate`` for ``method`` on the path of ``schedule``."""
        if method == "euler_maruyama":
            shape = DIFFUSION_SCHEDULES[self.diffusion_schedule or "vanishing"]
            diffusion = shape(1.0 if self.diffusion is None else self.diffusion)
            return {"schedule": schedule, "diffusion": diffusion, "generator": generator}
        if method == "flow_map" and self.gamma is not None:
            return {"schedule": schedule, "gamma": self.gamma, "generator": generator}
        return {}

    def label(self, method: str) -> str:
        """``method`` with its noise, for file names: ``euler_maruyama-vanishing1.0``,
        ``flow_map-gamma0.5``; the method alone for the deterministic samplers."""
        if method == "euler_maruyama":
            scale = 1.0 if self.diffusion is None else self.diffusion
            return f"{method}-{self.diffusion_schedule or 'vanishing'}{scale}"
        if method == "flow_map" and self.gamma is not None:
            return f"{method}-gamma{self.gamma}"
        return method


SECTIONS_WITH_NAME = ("data", "objective")


def with_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """``apply_overrides`` with the shorthand ``section=value`` for ``section.name=value``."""
    expanded = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in SECTIONS_WITH_NAME:
            item = f"{key.strip()}.name={value}"
        expanded.append(item)
    return apply_overrides(config, expanded)


def read_config_file(path: str | Path, root: str | Path | None = None) -> RunConfig:
    """The ``RunConfig`` in the JSON file ``path`` (a run's ``config.json`` or one written by
    hand; missing keys take their defaults). ``ConfigError`` names the file and the key."""
    try:
        data = json.loads(read_text(path, root=root))
    except RunFileError as error:
        raise ConfigError(str(error)) from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    try:
        return config_from_dict(RunConfig, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
