"""Cost of one exact-divergence evaluation ``(v, div v)`` on the benchmark MLP, by method.

    benchmarks/.venv/bin/python benchmarks/divergence_cost.py [--n 1000] [--repeats 9]

Times (median ms over interleaved repeats, one thread) a forward pass without and with the graph,
flowmatch's forward + D reverse passes (``solvers.likelihood._velocity_and_vjps``), the same
through ``torch.func.vjp``, and three forward-mode alternatives; every method's divergence is
checked against flowmatch's first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from flowmatch.solvers.likelihood import _velocity_and_vjps

from common import velocity_mlp

DIM = 2


def methods(net: torch.nn.Module, x: Tensor, t: Tensor) -> dict[str, Callable[[], Tensor | None]]:
    """Each method returns the divergence ``[B]`` (the two forward-only ones return None)."""
    n = x.shape[0]
    basis = torch.eye(DIM)[:, None, :].expand(DIM, n, DIM).contiguous()  # [D, B, D]

    def field(y: Tensor) -> Tensor:
        return net(y, t)

    def trace(rows: Tensor) -> Tensor:  # rows [D, B, D]: row i of each sample's Jacobian
        return torch.diagonal(rows, dim1=0, dim2=2).sum(-1)

    def forward_no_graph() -> None:
        with torch.no_grad():
            field(x)

    def forward_with_graph() -> None:
        with torch.enable_grad():
            field(x.detach().requires_grad_(True))

    def reverse() -> Tensor:
        return trace(_velocity_and_vjps(net, x, t, {}, basis)[1])

    def func_vjp() -> Tensor:
        with torch.enable_grad():
            _, pullback = torch.func.vjp(field, x)
            return trace(torch.stack([pullback(c)[0] for c in basis]))

    def vmap_jvp() -> Tensor:
        return trace(torch.func.vmap(lambda e: torch.func.jvp(field, (x,), (e,))[1])(basis))

    def replicated_jvp() -> Tensor:
        ts, xs = t.repeat(DIM), x.repeat(DIM, 1)
        _, tangent = torch.func.jvp(lambda y: net(y, ts), (xs,), (basis.flatten(0, 1),))
        return trace(tangent.reshape(DIM, n, DIM))

    def jvp_per_dimension() -> Tensor:
        return sum(torch.func.jvp(field, (x,), (basis[i],))[1][:, i] for i in range(DIM))

    return {
        "forward, no graph": forward_no_graph,
        "forward, graph kept for x": forward_with_graph,
        "forward + D reverse passes (flowmatch)": reverse,
        "torch.func.vjp + D pullbacks": func_vjp,
        "forward mode: vmap of jvp over the basis": vmap_jvp,
        "forward mode: batch replicated, one jvp": replicated_jvp,
        "forward mode: one jvp per dimension": jvp_per_dimension,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = velocity_mlp(DIM).requires_grad_(False)
    x, t = torch.randn(args.n, DIM), torch.full((args.n,), 0.5)
    found = methods(net, x, t)
    reference = found["forward + D reverse passes (flowmatch)"]()
    for name, method in found.items():
        div = method()
        if div is not None:
            torch.testing.assert_close(div, reference, rtol=1e-5, atol=1e-5, msg=name)
    times: dict[str, list[float]] = {name: [] for name in found}
    for _ in range(args.repeats):
        for name, method in found.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                method()
            times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    print(f"| what (n = {args.n}, D = {DIM}) | ms, median [min-max] |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}] |")


if __name__ == "__main__":
    main()
