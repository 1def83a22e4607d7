"""The measurements: training and sampling throughput, sample quality against NFE, likelihood
accuracy and cost, minibatch-OT training, and peak memory.

Timed quantities are rates (higher is better) collected by ``common.interleaved``, so run ``r``
of every side is a pair in time; the report turns them into paired ratios with their spread.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from torch import Tensor, nn

from flowmatch import solvers

from common import PeakRSS, build_net, interleaved, make_optimiser, seconds
from sides import FlowMatch, Side
from workloads import Workload

DATA_SEED = 1000  # repeat r trains on the pool drawn from DATA_SEED + r; its weights from seed r
EVAL_SEED = 2000  # the source points and target samples every side is evaluated on


@dataclass(frozen=True)
class Settings:
    """Sizes of one run; a workload overrides some for a full run (``Workload.settings``) and
    ``--smoke`` shrinks every one of them (``settings_for``)."""

    steps: int = 300
    repeats: int = 5
    batch_sizes: tuple[int, ...] | None = None  # None: the workload's own
    throughput_only_steps: int = 100  # runs at batch sizes after the first, timed only
    sampling_n: int = 4096
    sampling_nfe: int = 50
    eval_n: int = 1000
    euler_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 100)
    likelihood_n: int = 1000
    ot_batch: int = 512
    ot_euler_steps: tuple[int, ...] = (1, 2, 4, 8)
    flow_map_steps: tuple[int, ...] = (1, 2, 4, 8)
    memory_steps: int = 20
    tolerance: float = 1e-5  # atol = rtol of every dopri5 solve, for every side
    memory_in_fresh_process: bool = True

    def batches(self, workload: Workload) -> tuple[int, ...]:
        """Training batch sizes; the first one trains the networks that are evaluated."""
        return self.batch_sizes or workload.batch_sizes


SMOKE = Settings(
    steps=12,
    repeats=2,
    batch_sizes=(64,),
    sampling_n=256,
    sampling_nfe=4,
    eval_n=128,
    euler_steps=(1, 4),
    likelihood_n=32,
    ot_batch=64,
    ot_euler_steps=(1,),
    flow_map_steps=(1, 2),
    memory_steps=2,
    tolerance=1e-3,
    memory_in_fresh_process=False,
)


def settings_for(workload: Workload, smoke: bool, overrides: dict[str, object]) -> Settings:
    """``SMOKE``, or the defaults updated with the workload's own ``settings``; then
    ``overrides`` (the command line's), which win over both."""
    base = SMOKE if smoke else dataclasses.replace(Settings(), **workload.settings)
    return dataclasses.replace(base, **overrides)


class CountingNet(nn.Module):
    """Counts forward calls of ``net`` (the NFE a solver really spent); for untimed runs only."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: Tensor, *times: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x, *times)


def pools(workload: Workload, steps: int, batch: int) -> Callable[[int], Tensor]:
    """``pool(repeat)``: repeat ``repeat``'s batches (``Workload.data_pool`` from seed
    ``DATA_SEED + repeat``), drawn on first use. Only the latest is kept: interleaved runs use
    one repeat's pool at a time, so each is drawn once and the pools of other repeats never
    sit in memory alongside it."""
    return lru_cache(maxsize=1)(lambda repeat: workload.data_pool(steps, batch, DATA_SEED + repeat))


@dataclass
class TrainRuns:
    """Per variant: steps/s and final loss of each repeat, and each repeat's trained network."""

    rates: dict[str, list[float]]
    final_loss: dict[str, list[float]]
    nets: dict[str, list[nn.Module]]


def train_runs(
    variants: dict[str, tuple[Side, str]],
    workload: Workload,
    batch: int,
    steps: int,
    repeats: int,
) -> TrainRuns:
    """Train every ``label -> (side, coupling)`` for ``steps`` steps, ``repeats`` times,
    interleaved. Steps/s excludes the first tenth of the steps (at most 10: allocator and
    optimiser-state set-up); the final loss is the mean over the last tenth."""
    pool_of = pools(workload, steps, batch)
    warmup = min(10, steps // 10)
    final_loss: dict[str, list[float]] = {label: [] for label in variants}
    nets: dict[str, list[nn.Module]] = {label: [] for label in variants}

    def task(label: str):
        side, coupling = variants[label]

        def run(repeat: int) -> float:
            net = build_net(workload.make_net, repeat)
            step = side.trainer(net, make_optimiser(net), coupling, seed=repeat)
            pool, losses = pool_of(repeat), []
            for k in range(warmup):
                losses.append(step(pool[k]))
            elapsed = seconds(lambda: [losses.append(step(pool[k])) for k in range(warmup, steps)])
            tail = max(1, len(losses) // 10)
            final_loss[label].append(float(torch.stack(losses[-tail:]).mean()))
            nets[label].append(net)
            return (steps - warmup) / elapsed

        return run

    rates = interleaved({label: task(label) for label in variants}, repeats)
    return TrainRuns(rates=rates, final_loss=final_loss, nets=nets)


def training_loop_rates(
    side: FlowMatch, workload: Workload, settings: Settings, run_root: Path
) -> dict[str, list[float]]:
    """Steps/s of flowmatch's hand-written step (``side.trainer``) and of its full training loop
    ``flowmatch.training.train`` (data drawn per step from the in-memory pool as an
    ``ArrayDataset``, EMA, one log and one checkpoint at the end, setup included), interleaved,
    same objective, network, optimiser settings, batch and steps."""
    from flowmatch.data import ArrayDataset
    from flowmatch.training import TrainConfig, train

    batch = settings.batches(workload)[0]
    steps = settings.steps
    pool_of = pools(workload, steps, batch)

    def hand_step(repeat: int) -> float:
        net = build_net(workload.make_net, repeat)
        step = side.trainer(net, make_optimiser(net), "independent", seed=repeat)
        return steps / seconds(lambda: [step(x1) for x1 in pool_of(repeat)])

    def full_loop(repeat: int) -> float:
        net = build_net(workload.make_net, repeat)
        config = TrainConfig(
            seed=repeat, steps=steps, batch_size=batch, lr=1e-3, weight_decay=0.01,
            log_every=steps, checkpoint_every=steps, keep_checkpoints=1, device="cpu",
            num_threads=1,
        )  # fmt: skip
        source = ArrayDataset(pool_of(repeat).reshape(-1, *workload.shape))
        run_dir = run_root / f"loop-{repeat}"
        objective = side.objective("independent")
        return steps / seconds(lambda: train(net, objective, source, config, run_dir))

    return interleaved({"flowmatch step": hand_step, "flowmatch.training.train": full_loop},
                       settings.repeats)  # fmt: skip


def eval_points(workload: Workload, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source points ``x0: [n, *shape]``, the target set and a reference set of ``n`` each
    (``Workload.eval_targets``; target against reference is the metric's noise level)."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    x0 = torch.randn(n, *workload.shape, generator=generator)
    return x0, *workload.eval_targets(n, generator)


def sampling_rates(
    sides: dict[str, Side], net: nn.Module, workload: Workload, settings: Settings
) -> dict[str, list[float]]:
    """Samples/s of Euler at ``settings.sampling_nfe`` steps on one shared network."""
    x0, _, _ = eval_points(workload, settings.sampling_n)
    nfe, tol = settings.sampling_nfe, settings.tolerance
    samplers = {name: side.sampler(net, "euler", nfe, tol) for name, side in sides.items()}
    samplers = {name: fn for name, fn in samplers.items() if fn is not None}
    for fn in samplers.values():  # one untimed call each
        fn(x0[:8])

    def task(fn):
        return lambda repeat: settings.sampling_n / seconds(lambda: fn(x0))

    return interleaved({name: task(fn) for name, fn in samplers.items()}, settings.repeats)


def quality(
    side: Side,
    nets: list[nn.Module],
    workload: Workload,
    euler_steps: tuple[int, ...],
    settings: Settings,
) -> dict[str, dict[str, list[float]]]:
    """The workload's metrics of ``settings.eval_n`` samples against as many target points, for
    Euler at each step count and for dopri5, for each repeat's network. Keys ``euler-K`` and
    ``dopri5``; each holds every metric (``energy`` and ``w2``, or ``fd`` and ``kid``) and the
    NFE actually spent (``nfe``) per repeat."""
    x0, target, _ = eval_points(workload, settings.eval_n)
    out: dict[str, dict[str, list[float]]] = {}
    methods = [("euler", k) for k in euler_steps] + [("dopri5", None)]
    for net in nets:
        counted = CountingNet(net)
        for method, steps in methods:
            key = method if steps is None else f"{method}-{steps}"
            counted.calls = 0
            samples = side.sampler(counted, method, steps, settings.tolerance)(x0)
            record(out.setdefault(key, {}), workload.metrics(samples, target), counted.calls)
    return out


def record(entry: dict[str, list[float]], metrics: dict[str, float], nfe: int) -> None:
    """Append one network's metrics and NFE to the per-repeat lists of ``entry``."""
    for key, value in {**metrics, "nfe": nfe}.items():
        entry.setdefault(key, []).append(value)


def flow_map_study(side: FlowMatch, workload: Workload, settings: Settings) -> dict[str, object]:
    """flowmatch's flow maps: trained on the same pools, seeds, optimiser and step count as the
    velocity networks, then sampled with K = 1, 2, 4, 8 jumps. Same keys as ``quality``
    (``flow_map-K``), plus the training steps/s for context (a different network and loss)."""
    assert workload.make_flow_map is not None
    batch = settings.batches(workload)[0]
    x0, target, _ = eval_points(workload, settings.eval_n)
    out: dict[str, dict[str, list[float]]] = {}
    rates, final_loss = [], []
    for repeat in range(settings.repeats):
        flow_map = build_net(workload.make_flow_map, repeat)
        step = side.flow_map_trainer(flow_map, seed=repeat)
        pool = workload.data_pool(settings.steps, batch, DATA_SEED + repeat)
        start = time.perf_counter()
        losses = [step(x1) for x1 in pool]
        rates.append(settings.steps / (time.perf_counter() - start))
        final_loss.append(float(torch.stack(losses[-max(1, len(losses) // 10) :]).mean()))
        counted = CountingNet(flow_map)
        for k in settings.flow_map_steps:
            counted.calls = 0
            samples = solvers.sample(counted, x0, "flow_map", steps=k)
            entry = out.setdefault(f"flow_map-{k}", {})
            record(entry, workload.metrics(samples, target), counted.calls)
    return {"quality": out, "steps_per_s": rates, "final_loss": final_loss}


def metric_noise(workload: Workload, n: int) -> dict[str, float]:
    """The workload's metrics between two independent target sets of size ``n`` (disjoint
    held-out images for MNIST)."""
    _, target, reference = eval_points(workload, n)
    return workload.metrics(reference, target)


def likelihood_study(
    sides: dict[str, Side],
    shared_net: nn.Module,
    own_nets: dict[str, list[nn.Module]],
    workload: Workload,
    settings: Settings,
) -> dict[str, object]:
    """Time per 1000 samples of exact and Hutchinson (1 probe) likelihoods on ``shared_net``, and
    the NLL of each side's own trained networks against the exact NLL of the same test points."""
    assert workload.log_prob is not None
    test = workload.sample(settings.likelihood_n, torch.Generator().manual_seed(EVAL_SEED + 1))
    exact_nll = float(-workload.log_prob(test.double()).mean())
    offered = {name: side for name, side in sides.items() if offers(side, "likelihood")}
    result: dict[str, object] = {"exact_nll": exact_nll, "n": settings.likelihood_n, "rates": {}}
    for divergence in ("exact", "hutchinson"):
        fns = {
            name: side.likelihood(shared_net, divergence, 0, settings.tolerance)
            for name, side in offered.items()
        }
        nfe = {}
        for name, side in offered.items():  # untimed: warm-up and the NFE actually spent
            counted = CountingNet(shared_net)
            side.likelihood(counted, divergence, 0, settings.tolerance)(test)
            nfe[name] = counted.calls

        def task(fn):
            return lambda repeat: settings.likelihood_n / seconds(lambda: fn(test))

        result["rates"][divergence] = {
            "samples_per_s": interleaved({n: task(fn) for n, fn in fns.items()}, settings.repeats),
            "nfe": nfe,
        }
    nll: dict[str, dict[str, list[float]]] = {}
    for name, side in offered.items():
        entry = nll.setdefault(name, {"exact": [], "hutchinson": []})
        for repeat, net in enumerate(own_nets[name]):
            for divergence in ("exact", "hutchinson"):
                log_prob = side.likelihood(net, divergence, repeat, settings.tolerance)(test)
                entry[divergence].append(float(-log_prob.double().mean()))
    result["nll"] = nll
    return result


def ot_pair_reuse(batch: int, seed: int, draws: int = 5) -> dict[str, float]:
    """torchcfm's exact-OT sampler draws ``batch`` pairs from the plan with replacement: the
    mean fraction of distinct ``x0`` and ``x1`` that one training batch actually uses."""
    import numpy as np
    from torchcfm.optimal_transport import OTPlanSampler

    sampler = OTPlanSampler(method="exact")
    generator = torch.Generator().manual_seed(seed)
    np.random.seed(seed)
    fractions = {"x0": 0.0, "x1": 0.0}
    for _ in range(draws):
        x0 = torch.randn(batch, 2, generator=generator)
        x1 = torch.randn(batch, 2, generator=generator) + 2.0
        i, j = sampler.sample_map(sampler.get_map(x0, x1), batch)
        fractions["x0"] += len(np.unique(i)) / batch / draws
        fractions["x1"] += len(np.unique(j)) / batch / draws
    return fractions


def memory_probe(
    side: Side, workload: Workload, task: str, batch: int, steps: int, tol: float
) -> dict:
    """Run one task under ``PeakRSS``: the RSS before it and the peak during it, in MiB.

    ``task``: ``train`` (``steps`` steps at ``batch``), ``sample`` (Euler, 50 steps, ``batch``
    points) or ``likelihood`` (exact, dopri5, ``batch`` points).
    """
    net = build_net(workload.make_net, 0)
    points = torch.randn(batch, *workload.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    if task == "train":
        pool = workload.data_pool(steps, batch, DATA_SEED)
        step = side.trainer(net, make_optimiser(net), "independent", seed=0)

        def run() -> None:
            for k in range(steps):
                step(pool[k])
    elif task == "sample":
        run = partial(side.sampler(net, "euler", 50, tol), points)
    else:
        run = partial(side.likelihood(net, "exact", 0, tol), points)
    with PeakRSS() as rss:
        run()
    return {"before_mib": rss.before, "peak_mib": rss.peak}


def offers(side: Side, task: str) -> bool:
    """Whether ``side`` has code for ``task`` (``train``, ``sample`` or ``likelihood``)."""
    probe = nn.Identity()
    if task == "sample":
        return side.sampler(probe, "euler", 1, 1e-5) is not None
    if task == "likelihood":
        return side.likelihood(probe, "exact", 0, 1e-5) is not None
    return True


def memory_study(
    sides: dict[str, Side], workload: Workload, tasks: list[tuple[str, int]], settings: Settings
) -> dict[str, dict[str, dict]]:
    """``memory_probe`` of every side and ``(task, batch)`` it offers, each in a fresh process
    unless ``settings.memory_in_fresh_process`` is off (``--smoke``: in this one)."""
    script = Path(__file__).with_name("run.py")
    out: dict[str, dict[str, dict]] = {}
    for task, batch in tasks:
        for name, side in sides.items():
            if not offers(side, task):
                continue
            args = (task, batch, settings.memory_steps, settings.tolerance)
            if settings.memory_in_fresh_process:
                command = [sys.executable, str(script), "--workload", workload.name,
                           "--memory-probe", name, *map(str, args)]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                probe = json.loads(done.stdout.splitlines()[-1])
            else:
                probe = memory_probe(side, workload, *args)
            out.setdefault(f"{task}@{batch}", {})[name] = probe
    return out
