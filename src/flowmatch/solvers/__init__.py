"""ODE solvers, stochastic samplers, flow-map sampling and likelihood.

``sample`` returns a tensor; ``integrate`` returns an ``IntegrationResult`` with the NFE and an
optional trajectory (``method="euler_maruyama"`` and ``method="flow_map"`` with ``gamma`` sample
stochastically, see ``flowmatch.solvers.sde``); ``log_likelihood`` returns a
``LikelihoodResult``.
"""

from flowmatch.solvers.integrate import METHODS, IntegrationResult, integrate, sample
from flowmatch.solvers.likelihood import (
    LikelihoodResult,
    bits_per_dim,
    log_likelihood,
)
from flowmatch.solvers.sde import ConstantDiffusion, Diffusion, VanishingDiffusion
from flowmatch.solvers.steps import STEP_RULES, StepRule
from flowmatch.solvers.time_grids import uniform_time_grid

__all__ = [
    "METHODS",
    "STEP_RULES",
    "ConstantDiffusion",
    "Diffusion",
    "IntegrationResult",
    "LikelihoodResult",
    "StepRule",
    "VanishingDiffusion",
    "bits_per_dim",
    "integrate",
    "log_likelihood",
    "sample",
    "uniform_time_grid",
]
