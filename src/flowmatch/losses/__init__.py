"""Training objectives: per-sample losses ``[B]`` averaged over the non-batch dimensions.

Flow matching of a velocity (``cfm_loss``), and flow-map losses: distillation from a teacher
velocity (Lagrangian, Eulerian, progressive), self-distillation and MeanFlow, and the few-step
families (shortcut models, SplitMeanFlow, improved MeanFlow, alpha-Flow, Terminal Velocity
Matching, continuous-time consistency).
"""

from flowmatch.losses.few_step import (
    AlphaFlowObjective,
    ConsistencyTimePairs,
    ContinuousConsistencyObjective,
    ImprovedMeanFlowObjective,
    ShortcutObjective,
    ShortcutTimePairs,
    TerminalVelocityObjective,
    TerminalVelocityTimePairs,
    alpha_flow_loss,
    continuous_consistency_loss,
    improved_meanflow_loss,
    shortcut_loss,
    terminal_velocity_loss,
)
from flowmatch.losses.flow_map_objectives import (
    FusedLSDObjective,
    MapDistillationObjective,
    MeanFlowObjective,
    ProgressiveMapDistillationObjective,
    SelfDistillationObjective,
    esd,
    lsd,
    psd_midpoint,
    psd_uniform,
)
from flowmatch.losses.flow_maps import (
    LearnedLossWeight,
    SharedRandomness,
    diagonal_flow_matching_loss,
    directional_derivative,
    eulerian_map_distillation_loss,
    eulerian_self_distillation_loss,
    fused_lsd_losses,
    lagrangian_map_distillation_loss,
    lagrangian_self_distillation_loss,
    meanflow_loss,
    progressive_map_distillation_loss,
    progressive_self_distillation_loss,
)
from flowmatch.losses.flow_matching import FlowMatchingObjective, cfm_loss

__all__ = [
    "AlphaFlowObjective",
    "ConsistencyTimePairs",
    "ContinuousConsistencyObjective",
    "FlowMatchingObjective",
    "FusedLSDObjective",
    "ImprovedMeanFlowObjective",
    "LearnedLossWeight",
    "MapDistillationObjective",
    "MeanFlowObjective",
    "ProgressiveMapDistillationObjective",
    "SelfDistillationObjective",
    "SharedRandomness",
    "ShortcutObjective",
    "ShortcutTimePairs",
    "TerminalVelocityObjective",
    "TerminalVelocityTimePairs",
    "alpha_flow_loss",
    "cfm_loss",
    "continuous_consistency_loss",
    "diagonal_flow_matching_loss",
    "directional_derivative",
    "esd",
    "eulerian_map_distillation_loss",
    "eulerian_self_distillation_loss",
    "fused_lsd_losses",
    "improved_meanflow_loss",
    "lagrangian_map_distillation_loss",
    "lagrangian_self_distillation_loss",
    "lsd",
    "meanflow_loss",
    "progressive_map_distillation_loss",
    "progressive_self_distillation_loss",
    "psd_midpoint",
    "psd_uniform",
    "shortcut_loss",
    "terminal_velocity_loss",
]
