"""The ``Workload`` record: what a run trains on and how it is measured."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flowmatch.metrics import energy_distance, wasserstein2


class DataMissing(RuntimeError):
    """A workload's data files are not there; the one-line message names the command that
    fetches them."""


def sample_distances(samples: Tensor, target: Tensor) -> dict[str, float]:
    """Energy distance and exact W2 between two point sets ``[N, D]`` (the 2-D workloads)."""
    return {
        "energy": float(energy_distance(samples, target)),
        "w2": float(wasserstein2(samples, target)),
    }


@dataclass(frozen=True)
class Workload:
    """Data ``sample(n, generator) -> [n, *shape]``, the network every library trains,
    ``log_prob(x) -> [B]`` when the target density is known exactly (enables the NLL study) and
    the flow-map network flowmatch trains for few-step sampling, if any.

    Sample quality is ``metrics(samples, target) -> {key: value}`` (lower is better), labelled
    by ``metric_labels`` (key -> name in the report); its target points come from
    ``held_out(n, generator)`` (``n`` distinct points never trained on) when given, else from
    ``sample``. ``batch_sizes`` are the training batch sizes (the first trains the evaluated
    networks); ``settings`` overrides other fields of ``measure.Settings`` for a full run (not
    ``--smoke``); ``skip`` maps a section of ``run.py`` this workload leaves out to the reason.
    """

    name: str
    sample: Callable[[int, torch.Generator | None], Tensor]
    make_net: Callable[[], nn.Module]
    shape: tuple[int, ...]
    log_prob: Callable[[Tensor], Tensor] | None = None
    make_flow_map: Callable[[], nn.Module] | None = None
    batch_sizes: tuple[int, ...] = (512, 4096)
    held_out: Callable[[int, torch.Generator], Tensor] | None = None
    metrics: Callable[[Tensor, Tensor], dict[str, float]] = sample_distances
    metric_labels: dict[str, str] = field(
        default_factory=lambda: {"energy": "energy distance", "w2": "W2"}
    )
    settings: dict[str, object] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)

    def data_pool(self, steps: int, batch: int, seed: int) -> Tensor:
        """``[steps, batch, *shape]``: the batches of one training run, drawn once into memory
        and shared by every library (step ``k`` trains on ``pool[k]``)."""
        x = self.sample(steps * batch, torch.Generator().manual_seed(seed))
        return x.reshape(steps, batch, *x.shape[1:])

    def eval_targets(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two independent target sets ``[n, *shape]``: the samples' target and a reference for
        the metric's noise level (target against reference); disjoint when ``held_out``."""
        if self.held_out is None:
            return self.sample(n, generator), self.sample(n, generator)
        target, reference = self.held_out(2 * n, generator).split(n)
        return target, reference

    def unmeasured(self) -> dict[str, str]:
        """Sections of ``run.py`` this workload leaves out, with the reason."""
        reasons = dict(self.skip)
        if self.log_prob is None:
            reasons["likelihood"] = "no exact log-density to compare with"
        if self.make_flow_map is None:
            reasons["flow_maps"] = "no flow-map network"
        return reasons
