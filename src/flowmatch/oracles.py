"""Closed-form oracles: the exact marginal path from ``N(0, I)`` to a Gaussian or Gaussian mixture.

This module owns exact velocities, flow maps, densities, scores and divergences of the affine
path ``x_t = alpha(t) x1 + sigma(t) x0`` with ``x0 ~ N(0, I)``, derived below. Since ``x0`` is
Gaussian, ``x_t`` is exactly Gaussian (per component) at every t, including at ``t_min``.

For a component ``N(mu, C)`` with ``C = Q diag(lam) Q^T``, ``x_t`` has mean ``alpha mu`` and
covariance ``Sigma_t = sigma^2 I + alpha^2 C``, whose eigenvalues are ``var_i = sigma^2 + alpha^2
lam_i``. Its velocity ``u_t(x) = E[dx_t/dt | x_t = x]`` is the linear regression of the jointly
Gaussian pair ``(dx_t/dt, x_t)``, whose cross-covariance is ``sigma d_sigma I + alpha d_alpha C =
1/2 Sigma_dot``: ``u_t(x) = d_alpha mu + A_t (x - alpha mu)`` with
``A_t = 1/2 Sigma_dot Sigma^{-1} = Q diag((sigma d_sigma + alpha d_alpha lam_i) / var_i) Q^T``.
A mixture's velocity is the posterior average of its components' velocities (Lipman et al. 2022,
Theorem 1, conditioning on the component instead of on ``x1``).
Only the product ``sigma d_sigma = 1/2 d/dt sigma^2`` enters, which stays finite where ``sigma``
vanishes (for VP it is ``-alpha d_alpha``); as computed from the schedule it is finite on the
schedule's ``[t_min, t_max]``.

Inputs are flat, ``x: [B, d]`` and ``t: [B]``; results use the dtype and device of ``x``. The
oracles are unconditional: ``velocity``, ``flow_map``, ``slope`` and the call take the
``**model_kwargs`` of the :mod:`flowmatch.types` protocols but raise ``TypeError`` if any is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowmatch.paths.schedules import CondOTSchedule, Schedule
from flowmatch.shapes import check_time


def _unconditional(model_kwargs: dict[str, Any]) -> None:
    """Refuse model keyword arguments (e.g. labels ``y``), which an oracle has no use for."""
    if model_kwargs:
        raise TypeError(f"an oracle takes no model keyword arguments, got {sorted(model_kwargs)}")


@dataclass
class _ComponentTerms:
    """Per-component quantities at ``(x, t)`` in each component's eigenbasis ``C_k = Q lam Q^T``.

    ``y = Q^T (x - alpha mu): [B, K, d]``; ``var = sigma^2 + alpha^2 lam: [B, K, d]``;
    ``rate = (sigma d_sigma + alpha d_alpha lam) / var: [B, K, d]`` (eigenvalues of ``A_t``);
    ``log_joint = log pi_k + log N(x; alpha mu_k, Sigma_{t,k}): [B, K]``; ``q: [K, d, d]``,
    ``mu: [K, d]``, ``d_alpha: [B, 1, 1]``.
    """

    y: Tensor
    var: Tensor
    rate: Tensor
    log_joint: Tensor
    q: Tensor
    mu: Tensor
    d_alpha: Tensor

    def posterior(self) -> Tensor:
        """``w_k = softmax_k(log_joint)``: ``[B, K]``."""
        return torch.softmax(self.log_joint, dim=-1)

    def velocities(self) -> Tensor:
        """``u^(k)_t(x) = d_alpha mu_k + A_{t,k} (x - alpha mu_k)``: ``[B, K, d]``."""
        return self.d_alpha * self.mu + torch.einsum("kij,bkj->bki", self.q, self.rate * self.y)

    def scores(self) -> Tensor:
        """``g_k = -Sigma_{t,k}^{-1} (x - alpha mu_k)``: ``[B, K, d]``."""
        return torch.einsum("kij,bkj->bki", self.q, -self.y / self.var)


class GaussianMixtureOracle:
    """The exact path from ``N(0, I)`` to ``q = sum_k weights_k N(means_k, covs_k)``.

    ``weights: [K]`` (positive, normalised here), ``means: [K, d]``, ``covs: [K, d, d]``
    symmetric positive definite. Posterior weights ``w_k(t, x) = softmax_k(log pi_k +
    log N(x; alpha mu_k, Sigma_{t,k}))`` give ``u_t = sum_k w_k u^(k)_t`` (Lipman et al. 2022,
    Theorem 1, with the component ``k`` in place of ``x1``).
    """

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covs: Tensor,
        schedule: Schedule | None = None,
    ) -> None:
        weights, means, covs = (torch.as_tensor(a) for a in (weights, means, covs))
        if weights.dim() != 1 or means.dim() != 2 or means.shape[0] != weights.shape[0]:
            raise ValueError(
                f"weights must be [K] and means [K, d], got {list(weights.shape)} and "
                f"{list(means.shape)}"
            )
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must be [K, d, d] = [{k}, {d}, {d}], got {list(covs.shape)}")
        if not bool((weights > 0).all()):
            raise ValueError("mixture weights must be positive")
        covs64 = covs.to(torch.float64)
        if not torch.allclose(covs64, covs64.transpose(-1, -2)):
            raise ValueError("covariances must be symmetric")
        # Eigendecompositions in float64 once; cast to the input dtype at call time.
        eigenvalues, eigenvectors = torch.linalg.eigh(covs64)
        if not bool((eigenvalues > 0).all()):
            raise ValueError("covariances must be positive definite")
        self.schedule = CondOTSchedule() if schedule is None else schedule
        self.weights = weights.to(torch.float64) / weights.to(torch.float64).sum()
        self.means = means.to(torch.float64)
        self.covs = covs64
        self.eigenvalues = eigenvalues  # [K, d]
        self.eigenvectors = eigenvectors  # [K, d, d], columns are eigenvectors
        self.dim = d

    def _check_x(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [batch, {self.dim}], got {list(x.shape)}")

    def _cast(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``log pi: [K]``, ``mu: [K, d]``, ``lam: [K, d]``, ``Q: [K, d, d]`` cast like ``x``."""
        return (
            self.weights.log().to(x),
            self.means.to(x),
            self.eigenvalues.to(x),
            self.eigenvectors.to(x),
        )

    def _terms(self, x: Tensor, t: Tensor) -> _ComponentTerms:
        self._check_x(x)
        check_time(t, x)
        log_pi, mu, lam, q = self._cast(x)
        sch = self.schedule
        tb = t[:, None, None]
        alpha, sigma, d_alpha = sch.alpha(tb), sch.sigma(tb), sch.d_alpha(tb)
        y = torch.einsum("bki,kij->bkj", x[:, None, :] - alpha * mu, q)
        var = sigma * sigma + alpha * alpha * lam
        rate = (sigma * sch.d_sigma(tb) + alpha * d_alpha * lam) / var
        log_normal = -0.5 * (y * y / var + var.log()).sum(-1)
        log_normal = log_normal - 0.5 * self.dim * math.log(2 * math.pi)
        return _ComponentTerms(
            y=y, var=var, rate=rate, log_joint=log_pi + log_normal, q=q, mu=mu, d_alpha=d_alpha
        )

    def posterior(self, x: Tensor, t: Tensor) -> Tensor:
        """Component responsibilities ``w_k(t, x)``: ``[B, K]``."""
        return self._terms(x, t).posterior()

    def velocity(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Exact marginal velocity ``u_t(x) = sum_k w_k u^(k)_t(x)``: ``[B, d]``."""
        _unconditional(model_kwargs)
        terms = self._terms(x, t)
        return (terms.posterior()[..., None] * terms.velocities()).sum(1)

    def log_prob_t(self, x: Tensor, t: Tensor) -> Tensor:
        """``log p_t(x) = logsumexp_k [log pi_k + log N(x; alpha mu_k, Sigma_{t,k})]``: ``[B]``."""
        return torch.logsumexp(self._terms(x, t).log_joint, dim=-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p_1(x)`` of ``sum_k pi_k N(mu_k, C_k + sigma(1)^2 I)``: ``[B]``.

        ``sigma(1) = sigma_min`` for CondOT: the model's density is the target smoothed by it.
        """
        return self.log_prob_t(x, torch.ones(x.shape[0], device=x.device, dtype=x.dtype))

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """``grad log p_t(x) = sum_k w_k g_k``: ``[B, d]``."""
        terms = self._terms(x, t)
        return (terms.posterior()[..., None] * terms.scores()).sum(1)

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        """``div u_t(x) = sum_k w_k [tr A_{t,k} + (g_k - g_bar) . u^(k)]``: ``[B]``.

        The product rule on ``sum_k w_k u^(k)``, with ``grad w_k = w_k (g_k - g_bar)``, ``g_bar =
        sum_j w_j g_j``: the gradient of a softmax of ``log pi_k + log N_k`` whose gradients are
        the component scores ``g_k``.
        """
        terms = self._terms(x, t)
        w = terms.posterior()
        u_k, g_k = terms.velocities(), terms.scores()
        g_bar = (w[..., None] * g_k).sum(1, keepdim=True)
        per_component = terms.rate.sum(-1) + ((g_k - g_bar) * u_k).sum(-1)
        return (w * per_component).sum(-1)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw ``n`` points of the target ``q``: ``[n, d]``, on the generator's device (or CPU).

        ``dtype`` defaults to torch's default dtype; the draw itself is made in float64.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        f64 = torch.float64
        component = torch.multinomial(
            self.weights.to(device, f64), n, replacement=True, generator=generator
        )
        z = torch.randn(n, self.dim, generator=generator, device=device, dtype=f64)
        scale = (
            self.eigenvectors.to(device, f64) * self.eigenvalues.to(device, f64).sqrt()[:, None, :]
        )
        x = self.means.to(device, f64)[component] + torch.einsum("nij,nj->ni", scale[component], z)
        return x.to(torch.get_default_dtype() if dtype is None else dtype)


class GaussianOracle(GaussianMixtureOracle):
    """The exact path from ``N(0, I)`` to ``N(mean, cov)``, with its flow map.

    The covariances ``Sigma_t = sigma_t^2 I + alpha_t^2 cov`` commute, so ``d/dt Sigma_t^{1/2} =
    1/2 Sigma_dot_t Sigma_t^{-1/2}`` and ``X_{s,t}`` of :meth:`flow_map` solves ``dX/dt =
    u_t(X)``, ``X_{s,s} = id``: it is the flow of :meth:`velocity`.

    ``mean: [d]``, ``cov: [d, d]`` symmetric positive definite. Being a one-component mixture it
    has every method of :class:`GaussianMixtureOracle`; it is also an exact
    :class:`~flowmatch.types.FlowMap`: ``oracle(x, s, t)`` is ``flow_map`` and ``velocity`` its
    diagonal.
    """

    def __init__(self, mean: Tensor, cov: Tensor, schedule: Schedule | None = None) -> None:
        mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
        if mean.dim() != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"mean must be [d] and cov [d, d], got {list(mean.shape)} and {list(cov.shape)}"
            )
        super().__init__(torch.ones(1, dtype=torch.float64), mean[None], cov[None], schedule)

    @property
    def mean(self) -> Tensor:
        return self.means[0]

    @property
    def cov(self) -> Tensor:
        return self.covs[0]

    def _eigen_map(self, x: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``y = Q^T (x - alpha_s m)``, ``ratio_i = sqrt(var_{t,i} / var_{s,i})``, ``alpha_s``,
        ``alpha_t`` (all ``[B, d]`` or ``[B, 1]``)."""
        self._check_x(x)
        check_time(s, x, "s")
        check_time(t, x, "t")
        _, mu, lam, q = self._cast(x)
        mu, lam, q = mu[0], lam[0], q[0]
        sch = self.schedule
        alpha_s, alpha_t = sch.alpha(s)[:, None], sch.alpha(t)[:, None]
        var_s = sch.sigma(s)[:, None] ** 2 + alpha_s**2 * lam
        var_t = sch.sigma(t)[:, None] ** 2 + alpha_t**2 * lam
        y = (x - alpha_s * mu) @ q
        return y, (var_t / var_s).sqrt(), alpha_s, alpha_t

    def flow_map(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """``X_{s,t}(x) = alpha_t m + Sigma_t^{1/2} Sigma_s^{-1/2} (x - alpha_s m)``: ``[B, d]``."""
        _unconditional(model_kwargs)
        y, ratio, _, alpha_t = self._eigen_map(x, s, t)
        return alpha_t * self.mean.to(x) + (ratio * y) @ self.eigenvectors[0].to(x).T

    def __call__(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        return self.flow_map(x, s, t, **model_kwargs)

    def slope(self, x: Tensor, s: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Average velocity ``v_{s,t}(x) = (X_{s,t}(x) - x) / (t - s)``; ``u_s(x)`` if ``s == t``.

        Computed as ``(alpha_t - alpha_s)/(t - s) m + Q diag((r_i - 1)/(t - s)) Q^T (x - alpha_s
        m)`` so that the diagonal branch never divides by zero (gradients stay finite too).
        """
        _unconditional(model_kwargs)
        y, ratio, alpha_s, alpha_t = self._eigen_map(x, s, t)
        diagonal = (t == s)[:, None]
        dt = torch.where(diagonal, torch.ones_like(alpha_s), (t - s)[:, None])
        off_diagonal = (alpha_t - alpha_s) / dt * self.mean.to(x) + (
            (ratio - 1.0) / dt * y
        ) @ self.eigenvectors[0].to(x).T
        return torch.where(diagonal, self.velocity(x, s), off_diagonal)
