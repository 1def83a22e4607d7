"""The objective registry: every objective a run config can name, and what the application
does with it.

An entry says which network the objective trains (a velocity or a flow map), whether it distils
a teacher run, whether it pairs noise with data itself (so ``path.coupling`` applies), how to
build it, the default sampler of its runs and whether ``eval`` compares it with its teacher. The
command line's choices, the presets, ``distill``, ``sample`` and ``eval`` all read this table:
adding an objective is one entry here, plus its loss and its tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from flowmatch.losses import (
    AlphaFlowObjective,
    ContinuousConsistencyObjective,
    FlowMatchingObjective,
    FusedLSDObjective,
    ImprovedMeanFlowObjective,
    MapDistillationObjective,
    MeanFlowObjective,
    ProgressiveMapDistillationObjective,
    SelfDistillationObjective,
    ShortcutObjective,
    TerminalVelocityObjective,
    esd,
    eulerian_map_distillation_loss,
    lagrangian_map_distillation_loss,
    lsd,
    psd_midpoint,
    psd_uniform,
)
from flowmatch.losses.flow_maps import TimeDerivative
from flowmatch.paths import AffinePath
from flowmatch.reflow import ReflowObjective

if TYPE_CHECKING:
    from flowmatch.app.config import RunConfig


@dataclass(frozen=True)
class Parts:
    """What an objective is built from: the run's config, its path, coupling and time sampler,
    and the teacher's velocity for a distillation."""

    config: RunConfig
    path: AffinePath
    coupling: Callable[..., Tensor]
    time_sampler: Callable[..., Tensor]
    teacher: Callable[..., Tensor] | None = None


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registry entry.

    ``network``: what the objective trains; a ``flow_map`` run samples with its map (``jumps``)
    and evaluates quality against the number of jumps. ``teacher``: it distils a trained
    velocity run (``flowmatch distill --teacher RUN``); ``trains_on_teacher_pairs``: its data
    are the teacher's (noise, sample) pairs instead of the run's data; every other objective
    pairs noise with data itself, so ``path.coupling`` applies (``uses_coupling``).
    ``compare_with_teacher``: ``eval`` adds the teacher's Euler steps at the same NFE.
    ``time_scale``: the scale of the network's time embedding when ``model.time_scale`` is
    unset (None: 1 for a flow map, 1000 for a velocity;
    :func:`flowmatch.app.build.default_time_scale`). ``target_ema``: the default EMA rate of the
    copy of the network that gives its target (``objective.target_ema`` unset; None: it has no
    such copy). ``time_derivative``: how its time derivatives are taken when
    ``objective.time_derivative`` is unset, in fp32 (:func:`time_derivative_of`).
    ``settings``: the keys of :data:`OPTIONAL_SETTINGS` it reads; the others must keep their
    defaults in its config. ``jump_gamma``: the re-noising of its flow-map jumps when the sampler
    is not given one (``--gamma``; None: deterministic jumps); 1 for a map trained only to the
    data end, whose jumps from ``s`` to ``t < 1`` are untrained."""

    description: str
    network: Literal["velocity", "flow_map"]
    build: Callable[[Parts], Any]
    teacher: bool = False
    trains_on_teacher_pairs: bool = False
    compare_with_teacher: bool = False
    time_scale: float | None = None
    target_ema: float | None = None
    time_derivative: TimeDerivative = "jvp"
    settings: frozenset[str] = frozenset()
    jump_gamma: float | None = None

    @property
    def uses_coupling(self) -> bool:
        return not self.trains_on_teacher_pairs

    @property
    def is_flow_map(self) -> bool:
        return self.network == "flow_map"

    @property
    def default_solver(self) -> str | None:
        """``flow_map`` for flow-map runs; None: the run's ``eval.solver``."""
        return "flow_map" if self.is_flow_map else None


def target_ema_of(config: RunConfig) -> float | None:
    """``objective.target_ema``, unset: the registry entry's rate (None: no target copy)."""
    chosen = config.objective.target_ema
    return OBJECTIVES[config.objective.name].target_ema if chosen is None else chosen


def time_derivative_of(config: RunConfig) -> TimeDerivative:
    """``objective.time_derivative``, unset: the registry entry's, except the JVP under bf16
    (whose resolution a finite difference of step 1e-3 is below)."""
    chosen = config.objective.time_derivative
    if chosen is not None:
        return chosen
    if config.train.precision == "bf16":
        return "jvp"
    return OBJECTIVES[config.objective.name].time_derivative


def _flow_matching(parts: Parts) -> FlowMatchingObjective:
    return FlowMatchingObjective(
        parts.path,
        coupling=parts.coupling,
        time_sampler=parts.time_sampler,
        condition_aware=parts.config.path.condition_aware,
    )


def _self_distillation(
    distill: Callable[..., Tensor], takes_derivative: bool = True
) -> Callable[[Parts], SelfDistillationObjective]:
    def build(parts: Parts) -> SelfDistillationObjective:
        cfg = parts.config.objective
        method = time_derivative_of(parts.config)
        return SelfDistillationObjective(
            parts.path,
            functools.partial(distill, method=method) if takes_derivative else distill,
            diagonal_fraction=cfg.diagonal_fraction,
            learned_weight=cfg.learned_weight,
            both_orders=cfg.both_orders,
        )

    return build


def _lsd(parts: Parts) -> SelfDistillationObjective:
    """LSD; by finite differences on an MLP (which has no dropout) in two network calls a step,
    not four: 1.5x a flow-matching step on the 2-D MLP against 1.65x. A U-Net keeps four: one
    call of all the rows is no faster there (each call's fixed cost is small beside its work)
    and peaks 100 MiB higher in memory."""
    cfg = parts.config
    if time_derivative_of(cfg) != "finite_difference" or cfg.model.kind != "mlp":
        return _self_distillation(lsd)(parts)
    o = cfg.objective
    return FusedLSDObjective(parts.path, o.diagonal_fraction, o.learned_weight, o.both_orders)


def _map_distillation(loss: Callable[..., Tensor]) -> Callable[[Parts], MapDistillationObjective]:
    def build(parts: Parts) -> MapDistillationObjective:
        assert parts.teacher is not None
        cfg = parts.config.objective
        with_method = functools.partial(loss, method=time_derivative_of(parts.config))
        return MapDistillationObjective(
            parts.path, parts.teacher, with_method, learned_weight=cfg.learned_weight
        )

    return build


def _power(parts: Parts) -> float:
    return parts.config.objective.adaptive_power


def _consistency(
    parts: Parts, teacher: Callable[..., Tensor] | None
) -> ContinuousConsistencyObjective:
    cfg = parts.config
    return ContinuousConsistencyObjective(
        parts.path,
        teacher=teacher,
        warmup_steps=max(1, cfg.train.steps // 10),
        learned_weight=cfg.objective.learned_weight,
        time_derivative=time_derivative_of(cfg),
    )


def _progressive(parts: Parts) -> ProgressiveMapDistillationObjective:
    assert parts.teacher is not None
    learned = parts.config.objective.learned_weight
    return ProgressiveMapDistillationObjective(parts.path, parts.teacher, learned_weight=learned)


def _reflow(parts: Parts) -> ReflowObjective:
    mode = parts.config.objective.reflow_mode
    return ReflowObjective(parts.path, mode=mode, time_sampler=parts.time_sampler)


# objective.* keys that only some objectives read (ObjectiveEntry.settings)
OPTIONAL_SETTINGS = ("diagonal_fraction", "both_orders", "learned_weight", "adaptive_power")
_WEIGHTED = frozenset({"learned_weight"})
_SELF_DISTILLED = frozenset({"diagonal_fraction", "both_orders", "learned_weight"})
_POWERED = frozenset({"adaptive_power"})
_DISTILLED: dict[str, Any] = {"teacher": True, "compare_with_teacher": True, "settings": _WEIGHTED}

OBJECTIVES: dict[str, ObjectiveEntry] = {
    "fm": ObjectiveEntry(
        "conditional flow matching of a velocity (Lipman et al. 2022)",
        "velocity",
        _flow_matching,
    ),
    "lsd": ObjectiveEntry(
        "flow map by Lagrangian self-distillation (Boffi et al. 2025)",
        "flow_map",
        _lsd,
        # a central difference: two network calls for d_t X and its midpoint (LSD's target is
        # under sg), 1.41x a flow-matching step on the small U-Net against the JVP's 1.90x, the
        # same quality on the 2-D presets (3 seeds); on an MLP those two calls and the
        # diagonal's are one
        time_derivative="finite_difference",
        settings=_SELF_DISTILLED,
    ),
    "esd": ObjectiveEntry(
        "flow map by Eulerian self-distillation (Boffi et al. 2025)",
        "flow_map",
        _self_distillation(esd),
        settings=_SELF_DISTILLED,
    ),
    "psd-mid": ObjectiveEntry(
        "flow map by progressive self-distillation through the midpoint (Boffi et al. 2025)",
        "flow_map",
        _self_distillation(psd_midpoint, takes_derivative=False),
        settings=_SELF_DISTILLED,
    ),
    "psd-uniform": ObjectiveEntry(
        "flow map by progressive self-distillation through uniform points (Boffi et al. 2025)",
        "flow_map",
        _self_distillation(psd_uniform, takes_derivative=False),
        settings=_SELF_DISTILLED,
    ),
    "meanflow": ObjectiveEntry(
        "flow map by MeanFlow (Geng et al. 2025)",
        "flow_map",
        lambda parts: MeanFlowObjective(
            parts.path,
            power=_power(parts),
            time_derivative=time_derivative_of(parts.config),
        ),
        settings=_POWERED,
    ),
    "imf": ObjectiveEntry(
        "flow map by improved MeanFlow, the loss on v through u (arXiv 2512.02012)",
        "flow_map",
        lambda parts: ImprovedMeanFlowObjective(
            parts.path,
            power=_power(parts),
            time_derivative=time_derivative_of(parts.config),
        ),
        settings=_POWERED,
    ),
    "alpha-flow": ObjectiveEntry(
        "flow map by alpha-Flow's curriculum from flow matching to MeanFlow (arXiv 2510.20771)",
        "flow_map",
        lambda parts: AlphaFlowObjective(
            parts.path, end_step=parts.config.train.steps, power=_power(parts)
        ),
        settings=_POWERED,
    ),
    "shortcut": ObjectiveEntry(
        "flow map by shortcut models' self-consistency, no JVP (Frans et al. 2024)",
        "flow_map",
        lambda parts: ShortcutObjective(
            parts.path, learned_weight=parts.config.objective.learned_weight
        ),
        settings=_WEIGHTED,
    ),
    "split-meanflow": ObjectiveEntry(
        "flow map by SplitMeanFlow's interval splitting, no JVP (arXiv 2507.16884): the loss "
        "of psd-uniform",
        "flow_map",
        _self_distillation(psd_uniform, takes_derivative=False),
        settings=_SELF_DISTILLED,
    ),
    "tvm": ObjectiveEntry(
        "flow map by Terminal Velocity Matching (arXiv 2511.19797)",
        "flow_map",
        lambda parts: TerminalVelocityObjective(
            parts.path,
            time_derivative=time_derivative_of(parts.config),
            target_decay=target_ema_of(parts.config) or None,  # 0: the current parameters
        ),
        # its loss backpropagates through d_t X: at scale 1 it diverged on the checkerboard
        # (non-finite by 2000 steps), at 1000 it reaches energy 3.3e-3 in one jump
        time_scale=1000.0,
        # the official code's rate: one jump 1.05e-3 on the eight Gaussians against 3.90e-3 with
        # the current parameters as the target (0.20 against 0.37 on the checkerboard)
        target_ema=0.99,
    ),
    "sct": ObjectiveEntry(
        "consistency model X_{s,1} by continuous-time consistency training (Lu & Song 2024)",
        "flow_map",
        lambda parts: _consistency(parts, teacher=None),
        settings=_WEIGHTED,
        jump_gamma=1.0,
    ),
    "lmd": ObjectiveEntry(
        "flow map distilled from a teacher velocity, Lagrangian (Boffi et al. 2024)",
        "flow_map",
        _map_distillation(lagrangian_map_distillation_loss),
        **_DISTILLED,
    ),
    "emd": ObjectiveEntry(
        "flow map distilled from a teacher velocity, Eulerian (Boffi et al. 2024)",
        "flow_map",
        _map_distillation(eulerian_map_distillation_loss),
        **_DISTILLED,
    ),
    "pfmm": ObjectiveEntry(
        "flow map distilled progressively from a teacher (Boffi et al. 2024)",
        "flow_map",
        _progressive,
        **_DISTILLED,
    ),
    "scd": ObjectiveEntry(
        "consistency model X_{s,1} distilled from a teacher velocity (Lu & Song 2024)",
        "flow_map",
        lambda parts: _consistency(parts, teacher=parts.teacher),
        **_DISTILLED,
        jump_gamma=1.0,
    ),
    "reflow": ObjectiveEntry(
        "flow matching on a teacher's (noise, sample) pairs (Liu et al. 2022)",
        "velocity",
        _reflow,
        teacher=True,
        trains_on_teacher_pairs=True,
    ),
}

DISTILLATIONS = tuple(name for name, entry in OBJECTIVES.items() if entry.teacher)
