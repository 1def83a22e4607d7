"""Where flowmatch's training step and Euler sampling spend their time: cProfile (Python
functions) and torch.profiler (operators), top entries written to one text file."""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import build_net, make_optimiser
from measure import DATA_SEED, eval_points
from sides import FlowMatch
from workloads import Workload

TOP = 20


def _sections(title: str, fn) -> list[str]:
    fn()  # warm-up outside the profile
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer).strip_dirs()
    stats.sort_stats("tottime").print_stats(TOP)
    stats.sort_stats("cumulative").print_stats(TOP)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP)
    return [f"==== {title}: cProfile ====", buffer.getvalue(),
            f"==== {title}: torch.profiler ====", table, ""]  # fmt: skip


def profile_flowmatch(
    workload: Workload, path: Path, steps: int = 50, batch: int = 512, n: int = 4096, nfe: int = 50
) -> None:
    """Profile ``steps`` training steps at ``batch`` and one Euler sampling call (``n`` points,
    ``nfe`` steps) of the flowmatch side; write the tables to ``path``."""
    side = FlowMatch()
    net = build_net(workload.make_net, 0)
    step = side.trainer(net, make_optimiser(net), "independent", seed=0)
    pool = workload.data_pool(steps, batch, DATA_SEED)
    sampler = side.sampler(net, "euler", nfe, 1e-5)
    x0 = eval_points(workload, n)[0]
    lines = _sections(
        f"training, {steps} steps at batch {batch}", lambda: [step(x1) for x1 in pool]
    )
    lines += _sections(f"sampling, Euler {nfe} steps, {n} points", lambda: sampler(x0))
    path.write_text("\n".join(lines))
    torch.set_grad_enabled(True)
