"""The sides of the comparison: how each library trains one step, samples and computes a likelihood.

Every side gets the same network, optimiser, data batch and seed; it uses its own code for the
path, the loss target, the coupling and the ODE solve, written the way its documentation and
examples do. Data are ``[B, *shape]`` (points ``[B, 2]`` or images ``[B, 1, 28, 28]``); every
network takes ``t: [B]``.

- ``bare``: no library code at all, the floor. ``x0`` and ``t`` come from plain ``torch.randn`` /
  ``torch.rand``, ``x_t = t x1 + (1 - t) x0``, target ``x1 - x0``.
- ``flowmatch``: ``FlowMatchingObjective`` on ``AffinePath(CondOTSchedule())`` with
  ``UniformTimeSampler`` and a coupling of ``flowmatch.couplings``; ``flowmatch.solvers.sample``
  and ``log_likelihood``. Its full training loop ``flowmatch.training.train`` is measured
  separately (``measure.training_loop_rates``).
- ``torchcfm``: ``ConditionalFlowMatcher(sigma=0)`` and
  ``ExactOptimalTransportConditionalFlowMatcher`` (POT ``emd``, pairs drawn with replacement);
  the package has no sampler, so sampling uses ``torchdiffeq.odeint`` as its examples do
  (``torchdyn``, the other option in its README, is not installed: it pulls pytorch-lightning).
  It has no likelihood in the package (a notebook only).
- ``flow_matching`` (Meta): ``AffineProbPath(CondOTScheduler())``; ``ODESolver.sample`` and
  ``ODESolver.compute_likelihood`` through a ``ModelWrapper``.

A side whose library is not importable is reported as skipped with the import error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowmatch import solvers
from flowmatch.couplings import ExactOTCoupling, IndependentCoupling, SinkhornCoupling
from flowmatch.losses.flow_map_objectives import SelfDistillationObjective
from flowmatch.losses.flow_matching import FlowMatchingObjective
from flowmatch.paths import AffinePath, CondOTSchedule, UniformTimeSampler

from common import make_optimiser, optimiser_step

TrainStep = Callable[[Tensor], Tensor]  # x1 batch -> detached loss
Sampler = Callable[[Tensor], Tensor]  # x0 -> x1
Likelihood = Callable[[Tensor], Tensor]  # x1 -> log p(x1)


class Side:
    """One library's code paths. ``couplings`` lists the training couplings it offers."""

    name: str = ""
    couplings: tuple[str, ...] = ("independent",)

    def trainer(
        self, net: nn.Module, optimiser: torch.optim.Optimizer, coupling: str, seed: int
    ) -> TrainStep:
        raise NotImplementedError

    def sampler(self, net: nn.Module, method: str, steps: int | None, tol: float) -> Sampler | None:
        """``method`` is ``euler`` (``steps`` uniform steps) or ``dopri5`` (``atol = rtol =
        tol``); None: not offered."""
        raise NotImplementedError

    def likelihood(
        self, net: nn.Module, divergence: str, seed: int, tol: float
    ) -> Likelihood | None:
        """``divergence`` is ``exact`` or ``hutchinson`` (one probe), solved by dopri5 with
        ``atol = rtol = tol``; None: not offered."""
        return None


class Bare(Side):
    """Plain torch: the same network, loss and optimiser with no library code."""

    name = "bare"

    def trainer(self, net, optimiser, coupling, seed):
        torch.manual_seed(seed)

        def step(x1: Tensor) -> Tensor:
            x0 = torch.randn_like(x1)
            t = torch.rand(x1.shape[0])
            t_x = t.reshape(-1, *(1,) * (x1.dim() - 1))  # [B, 1, ...]: broadcasts over x
            x_t = t_x * x1 + (1 - t_x) * x0
            return optimiser_step(optimiser, ((net(x_t, t) - (x1 - x0)) ** 2).mean())

        return step

    def sampler(self, net, method, steps, tol):
        return None


class FlowMatch(Side):
    """flowmatch's public pieces: ``FlowMatchingObjective`` (per-sample loss ``[B]``, averaged
    here), ``flowmatch.couplings``, ``flowmatch.solvers``."""

    name = "flowmatch"
    couplings = ("independent", "exact_ot", "exact_ot_block128", "exact_ot_block64", "sinkhorn")

    def trainer(self, net, optimiser, coupling, seed):
        objective = self.objective(coupling)
        generator = torch.Generator().manual_seed(seed)
        step_index = 0

        def step(x1: Tensor) -> Tensor:
            nonlocal step_index
            loss = objective(net, {"x1": x1}, step_index, generator).mean()
            step_index += 1
            return optimiser_step(optimiser, loss)

        return step

    @staticmethod
    def objective(coupling: str) -> FlowMatchingObjective:
        """``FlowMatchingObjective`` on the CondOT path, uniform t, the named coupling."""
        pairing = {
            "independent": IndependentCoupling(),
            "exact_ot": ExactOTCoupling(),
            "exact_ot_block128": ExactOTCoupling(block_size=128),
            "exact_ot_block64": ExactOTCoupling(block_size=64),
            "sinkhorn": SinkhornCoupling(),
        }[coupling]
        return FlowMatchingObjective(AffinePath(CondOTSchedule()), pairing, UniformTimeSampler())

    def sampler(self, net, method, steps, tol):
        def run(x0: Tensor) -> Tensor:
            return solvers.sample(net, x0, method, steps=steps, atol=tol, rtol=tol)

        return run

    def flow_map_trainer(self, flow_map: nn.Module, seed: int) -> TrainStep:
        """Lagrangian self-distillation (``SelfDistillationObjective`` defaults: LSD, 3/4 of the
        batch on the diagonal, no learned loss weight, as the presets) with the shared AdamW."""
        objective = SelfDistillationObjective(AffinePath(CondOTSchedule()))
        optimiser = make_optimiser(nn.ModuleList([flow_map, objective]))
        generator = torch.Generator().manual_seed(seed)
        step_index = 0

        def step(x1: Tensor) -> Tensor:
            nonlocal step_index
            loss = objective(flow_map, {"x1": x1}, step_index, generator).mean()
            step_index += 1
            return optimiser_step(optimiser, loss)

        return step

    def likelihood(self, net, divergence, seed, tol):
        def run(x1: Tensor) -> Tensor:
            generator = torch.Generator().manual_seed(seed)
            result = solvers.log_likelihood(
                net, x1, divergence=divergence, generator=generator, atol=tol, rtol=tol
            )
            return result.log_prob

        return run


class TorchCFM(Side):
    """torchcfm 1.0.7: a matcher returns ``(t, x_t, u_t)``; the user writes the MSE."""

    name = "torchcfm"
    couplings = ("independent", "exact_ot")

    def __init__(self) -> None:
        import torchcfm.conditional_flow_matching as cfm
        import torchdiffeq

        self.cfm = cfm
        self.odeint = torchdiffeq.odeint

    def trainer(self, net, optimiser, coupling, seed):
        if coupling == "independent":
            matcher = self.cfm.ConditionalFlowMatcher(sigma=0.0)
        else:  # OTPlanSampler("exact"): POT emd, pairs drawn from the plan with replacement
            matcher = self.cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
        torch.manual_seed(seed)
        np.random.seed(seed)  # torchcfm draws OT pairs with numpy's global generator

        def step(x1: Tensor) -> Tensor:
            x0 = torch.randn_like(x1)
            t, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1)
            return optimiser_step(optimiser, torch.mean((net(x_t, t) - u_t) ** 2))

        return step

    def sampler(self, net, method, steps, tol):
        options: dict[str, Any] = {"method": method}
        if method == "dopri5":
            options.update(atol=tol, rtol=tol)

        t_span = torch.linspace(0.0, 1.0, (steps or 1) + 1)

        def run(x0: Tensor) -> Tensor:
            def field(t: Tensor, x: Tensor) -> Tensor:
                return net(x, t.expand(x.shape[0]))

            with torch.no_grad():
                return self.odeint(field, x0, t_span, **options)[-1]

        return run


class MetaFlowMatching(Side):
    """Meta's flow_matching 1.0.10: ``AffineProbPath`` for training, ``ODESolver`` for the rest."""

    name = "flow_matching"

    def __init__(self) -> None:
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper

        class Wrapped(ModelWrapper):
            # ODESolver passes a 0-dim t; the network takes t: [B].
            def forward(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
                return self.model(x, t.expand(x.shape[0]))

        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.solver = ODESolver
        self.wrap = Wrapped

    def trainer(self, net, optimiser, coupling, seed):
        torch.manual_seed(seed)
        path = self.path

        def step(x1: Tensor) -> Tensor:
            x0 = torch.randn_like(x1)
            t = torch.rand(x1.shape[0])
            sample = path.sample(t=t, x_0=x0, x_1=x1)
            loss = ((net(sample.x_t, sample.t) - sample.dx_t) ** 2).mean()
            return optimiser_step(optimiser, loss)

        return step

    def sampler(self, net, method, steps, tol):
        solver = self.solver(velocity_model=self.wrap(net))
        grid = torch.linspace(0.0, 1.0, (steps or 1) + 1)

        def run(x0: Tensor) -> Tensor:
            return solver.sample(
                x_init=x0,
                step_size=None,
                method=method,
                time_grid=grid,
                atol=tol,
                rtol=tol,
            )

        return run

    def likelihood(self, net, divergence, seed, tol):
        solver = self.solver(velocity_model=self.wrap(net))
        grid = torch.tensor([1.0, 0.0])

        def log_p0(x: Tensor) -> Tensor:
            dims = x[0].numel()
            return -0.5 * x.flatten(1).square().sum(1) - 0.5 * dims * np.log(2 * np.pi)

        def run(x1: Tensor) -> Tensor:
            torch.manual_seed(seed)  # the Hutchinson probe comes from torch's global generator
            _, log_prob = solver.compute_likelihood(
                x_1=x1,
                log_p0=log_p0,
                step_size=None,
                method="dopri5",
                time_grid=grid,
                atol=tol,
                rtol=tol,
                exact_divergence=divergence == "exact",
            )
            return log_prob

        return run


SIDES: dict[str, type[Side]] = {
    side.name: side for side in (Bare, FlowMatch, TorchCFM, MetaFlowMatching)
}


def load_sides(names: list[str]) -> tuple[dict[str, Side], dict[str, str]]:
    """Instantiate the named sides; those whose library fails to import go to ``skipped``."""
    sides: dict[str, Side] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            sides[name] = SIDES[name]()
        except ImportError as error:
            skipped[name] = f"not importable here: {error}"
    return sides, skipped
