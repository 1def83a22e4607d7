"""What every side of the comparison shares: the network, the optimiser step, the interleaved
timing protocol and the statistics that turn repeats into ratios with their spread.

One network definition serves every library (``velocity_mlp``), built from the same seed, so the
weights are identical at step 0; the optimiser step is the same hand-written AdamW update for all.
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowmatch.nets import MLP, FlowMapNet

LEARNING_RATE = 1e-3


def velocity_mlp(dim: int) -> nn.Module:
    """``v(x, t)``: ``[x, emb(t)] -> 256 -> 256 -> 256 -> dim`` with SiLU (``flowmatch.nets.MLP``,
    64 sinusoidal time features concatenated with ``x``)."""
    return MLP(dim, hidden=256, depth=3, activation="silu")


def flow_map_mlp(dim: int) -> nn.Module:
    """``X(x, s, t) = x + (t - s) v(x, s, t)`` over the same MLP with a second time input
    (``flowmatch.nets.FlowMapNet``); flowmatch only, no other library trains flow maps."""
    return FlowMapNet(MLP(dim, hidden=256, depth=3, activation="silu", num_times=2))


def build_net(make_net: Callable[[], nn.Module], seed: int) -> nn.Module:
    """The workload's network with weights drawn from ``seed`` (identical for every library)."""
    torch.manual_seed(seed)
    return make_net()


def make_optimiser(net: nn.Module) -> torch.optim.Optimizer:
    """AdamW, lr 1e-3, torch defaults otherwise (weight decay 0.01), for every library."""
    return torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)


def optimiser_step(optimiser: torch.optim.Optimizer, loss: Tensor) -> Tensor:
    """The one training update every side uses: zero grads, backward, step; the loss, detached."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return loss.detach()


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(tasks: dict[str, Callable[[int], float]], repeats: int) -> dict[str, list[float]]:
    """Run ``tasks[name](repeat)`` for every name, repeat by repeat (A B C, C B A, A B C, ...).

    Interleaving puts the runs of different libraries next to each other in time, so a change in
    the machine's load hits all of them; reversing the order every other repeat cancels a linear
    drift. Returns each task's values in repeat order, so value ``r`` of two tasks forms a pair.
    """
    values: dict[str, list[float]] = {name: [] for name in tasks}
    names = list(tasks)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            values[name].append(tasks[name](repeat))
    return values


@dataclass
class Spread:
    """Median of repeats with the smallest and largest value."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def verdict(self) -> str:
        """``>1`` or ``<1`` only if every repeat agrees, else ``~1`` (not distinguishable)."""
        if self.low > 1.0:
            return ">1"
        if self.high < 1.0:
            return "<1"
        return "~1"

    def as_dict(self) -> dict[str, float | str]:
        return {"median": self.median, "low": self.low, "high": self.high}


def paired_ratio(numerator: list[float], denominator: list[float]) -> Spread:
    """Spread of the per-repeat ratios ``numerator[r] / denominator[r]`` (runs next in time)."""
    return Spread.of([a / b for a, b in zip(numerator, denominator, strict=True)])


def rss_mib() -> float:
    """The process's current resident set size in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """``with PeakRSS() as peak:`` polls the resident set size every millisecond on a thread;
    afterwards ``peak.before`` is the RSS on entry and ``peak.peak`` the largest seen (MiB).

    torch releases the GIL inside its operators, so the poller sees the transient peaks of the
    block's large allocations; the rise ``peak - before`` is what the block needed on top.
    """

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
