"""Training objectives: per-sample losses ``[B]`` averaged over the non-batch dimensions."""

from flowmatch.losses.flow_matching import FlowMatchingObjective, cfm_loss

__all__ = ["FlowMatchingObjective", "cfm_loss"]
