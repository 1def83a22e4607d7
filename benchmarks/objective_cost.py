"""Cost of one training step of each flow-map objective relative to plain flow matching.

    benchmarks/.venv/bin/python benchmarks/objective_cost.py [--net mlp unet] [--repeats 5]

A step is the objective's per-sample loss, its mean, backward and an AdamW update, on one thread.
``mlp``: the 2-D benchmark MLP (4 x 256), batch 256; ``unet``: the MNIST workload's small U-Net
(178k parameters), batch 64 of random images (the cost does not depend on the pixels). Flow
matching trains the velocity network; every flow-map objective trains the same network with a
second time input; the distillation ones use the velocity network, frozen, as the teacher.
Timing is interleaved (every objective once per repeat); each repeat's time is divided by flow
matching's in the same repeat. Peak memory: each objective's steps again in a fresh process,
the resident set's rise over its state before the first step (``common.PeakRSS``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from flowmatch.app.build import build_objective
from flowmatch.app.config import ObjectiveConfig, RunConfig
from flowmatch.app.objectives import OBJECTIVES as REGISTRY
from flowmatch.nets import FlowMapNet

from common import PeakRSS, build_net, flow_map_mlp, make_optimiser, seconds, velocity_mlp
from workloads.mnist import small_unet

NETS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (lambda: velocity_mlp(2), lambda: flow_map_mlp(2), (2,), 256),
    "unet": (small_unet, lambda: FlowMapNet(small_unet(num_times=2)), (1, 28, 28), 64),
}
# Every registered objective that trains on the run's data (reflow trains on a teacher's pairs),
# the JVP objectives with their time derivative by finite differences (``NAME:fd``), and
# MeanFlow and iMF with their stop-gradient tangent computed without a graph (``:graphfree``).
OBJECTIVES = tuple(n for n, e in REGISTRY.items() if not e.trains_on_teacher_pairs)
OBJECTIVES += (
    "lsd:fd",
    "esd:fd",
    "meanflow:fd",
    "imf:fd",
    "lmd:fd",
    "sct:fd",
    "scd:fd",
    "meanflow:graphfree",
    "imf:graphfree",
)


def make_step(net_name: str, objective: str, seed: int = 0) -> Callable[[], Tensor]:
    """One training step of ``objective`` on the ``net_name`` networks, as a closure."""
    make_velocity, make_flow_map, shape, batch = NETS[net_name]
    name, _, variant = objective.partition(":")
    entry = REGISTRY[name]
    velocity = build_net(make_velocity, seed)
    teacher = "teacher" if entry.teacher else None  # the teacher is the velocity net below
    derivative = "finite_difference" if variant == "fd" else "jvp"
    objective_config = ObjectiveConfig(name=name, teacher=teacher, time_derivative=derivative)
    config = RunConfig(objective=objective_config)
    model = build_net(make_flow_map, seed) if entry.is_flow_map else velocity
    loss_fn = build_objective(config, velocity.requires_grad_(False) if entry.teacher else None)
    if variant == "graphfree":
        loss_fn.tangent_graph = False
    optimiser = make_optimiser(model)
    generator = torch.Generator().manual_seed(seed)
    data = {"x1": torch.randn(batch, *shape, generator=generator)}

    def step() -> Tensor:
        loss = loss_fn(model, data, 0, generator).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.detach()

    return step


def run_steps(step: Callable[[], Tensor], count: int) -> None:
    for _ in range(count):
        step()


def memory_probe(net_name: str, objective: str, count: int) -> float:
    """Peak RSS rise (MiB) of ``count`` steps in this process (run it in a fresh one)."""
    step = make_step(net_name, objective)
    with PeakRSS() as rss:
        run_steps(step, count)
    return rss.peak - rss.before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", nargs="+", choices=sorted(NETS), default=["mlp", "unet"])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    probe_args = ("NET", "OBJECTIVE", "STEPS")  # internal: one memory probe in this process
    parser.add_argument("--probe", nargs=3, metavar=probe_args, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe:
        net_name, objective, count = args.probe
        print(json.dumps(memory_probe(net_name, objective, int(count))))  # MiB
        return
    objectives = ["fm", *(o for o in args.objectives if o != "fm")]
    for net_name in args.net:
        steps = {name: make_step(net_name, name) for name in objectives}
        for step in steps.values():  # warm-up: first-call allocations, lazy initialisation
            run_steps(step, 2)
        ratios: dict[str, list[float]] = {name: [] for name in objectives}
        for _ in range(args.repeats):
            times = {name: seconds(partial(run_steps, s, args.steps)) for name, s in steps.items()}
            for name in objectives:
                ratios[name].append(times[name] / times["fm"])
        print(f"\n{net_name}: step time / flow matching's, median [min-max] of {args.repeats}")
        print("| objective | step time / fm's | peak RSS rise, MiB |\n|---|---|---|")
        for name in objectives:
            probe = subprocess.run(
                [sys.executable, __file__, "--probe", net_name, name, str(args.steps)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rise = json.loads(probe.stdout)
            r = ratios[name]
            spread = f"{statistics.median(r):.2f} [{min(r):.2f}-{max(r):.2f}]"
            print(f"| {name} | {spread} | {rise:.1f} |")


if __name__ == "__main__":
    main()
