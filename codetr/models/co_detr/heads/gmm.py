"""Two-component 1-D Gaussian mixtures fitted by EM, many at once (PAA's per-GT loss split).

PAA (Kim & Lee, ECCV 2020) models each ground-truth box's candidate losses as a mixture of a
"positive" and a "negative" Gaussian. The fit follows what mmdet's PAAHead gets from scikit-learn's
GaussianMixture(2, covariance_type="diag") with its defaults, so the same data gives the same split:
  - init: means (min, max) of the row's values, variances 1 (precisions 1), weights (0.5, 0.5);
  - each iteration: E-step (responsibilities, and the lower bound = mean log-likelihood under the
    current parameters), then M-step (weights, means, variances + reg_covar); stop after the
    iteration where the lower bound changed by less than tol, or after max_iter iterations;
  - predict = the component with the larger weighted density; score_samples = log mixture density.
Rows are independent fits; a row stops updating once it has converged, exactly as its own fit would.
Computation runs in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class GaussianMixture1D:
    """G fitted two-component mixtures; component 0 starts at the row minimum, component 1 at its maximum."""

    weights: Tensor  # [G, 2] float64, rows sum to 1
    means: Tensor  # [G, 2] float64
    variances: Tensor  # [G, 2] float64 (reg_covar included)
    converged: Tensor  # [G] bool
    num_iters: Tensor  # [G] int64, EM iterations run

    def weighted_log_prob(self, values: Tensor) -> Tensor:
        """log(weight_k * N(x | mean_k, var_k)) of values [G, K] -> [G, K, 2] float64."""
        x = values.to(torch.float64)[..., None]  # [G, K, 1]
        mean, var = self.means[:, None, :], self.variances[:, None, :]
        log_density = -0.5 * (_LOG_2PI + var.log() + (x - mean) ** 2 / var)
        return log_density + self.weights.log()[:, None, :]

    def predict(self, values: Tensor) -> Tensor:
        """Most probable component (0 or 1) of each value [G, K] -> [G, K] int64; ties -> 0."""
        return self.weighted_log_prob(values).argmax(dim=-1)

    def score_samples(self, values: Tensor) -> Tensor:
        """Log density of each value [G, K] under its row's mixture -> [G, K] float64."""
        return self.weighted_log_prob(values).logsumexp(dim=-1)


def _masked_min_max(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    low = torch.where(mask, values, inf).min(dim=1).values
    high = torch.where(mask, values, -inf).max(dim=1).values
    has_any = mask.any(dim=1)
    return torch.where(has_any, low, 0.0), torch.where(has_any, high, 0.0)


def _m_step(values: Tensor, resp: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weights, means, variances [G, 2] from responsibilities resp [G, K, 2] (zero on masked values)."""
    # scikit-learn adds 10 * eps to each component's mass so that an empty component does not divide by 0
    mass = resp.sum(dim=1) + 10 * torch.finfo(resp.dtype).eps  # [G, 2]
    means = (resp * values[..., None]).sum(dim=1) / mass
    variances = (resp * (values[..., None] - means[:, None, :]) ** 2).sum(dim=1) / mass + reg_covar
    return mass / mass.sum(dim=1, keepdim=True), means, variances


def fit_gaussian_mixture_1d(
    values: Tensor,
    mask: Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
) -> GaussianMixture1D:
    """Fit a two-component 1-D Gaussian mixture to each row of values [G, K] (mask [G, K] bool, True = use).

    Defaults are scikit-learn's (max_iter 100, tol 1e-3, reg_covar 1e-6). A row needs at least two
    values to be meaningful; rows with fewer are still returned (callers skip them, as PAA does).
    """
    if values.dim() != 2:
        raise ValueError(f"fit_gaussian_mixture_1d: values must be [G, K], got {tuple(values.shape)}")
    if max_iter < 1:
        raise ValueError(f"fit_gaussian_mixture_1d: max_iter must be >= 1, got {max_iter}")
    x = values.detach().to(torch.float64)
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if mask.shape != x.shape:
        raise ValueError(f"fit_gaussian_mixture_1d: mask {tuple(mask.shape)} must match values {tuple(x.shape)}")
    x = torch.where(mask, x, 0.0)
    rows = x.shape[0]
    count = mask.sum(dim=1).clamp(min=1).to(torch.float64)  # [G]
    low, high = _masked_min_max(x, mask)
    model = GaussianMixture1D(
        weights=x.new_full((rows, 2), 0.5),
        means=torch.stack((low, high), dim=1),
        variances=x.new_ones((rows, 2)),
        converged=torch.zeros(rows, dtype=torch.bool, device=x.device),
        num_iters=torch.zeros(rows, dtype=torch.long, device=x.device),
    )
    active = torch.ones(rows, dtype=torch.bool, device=x.device)
    lower_bound = x.new_full((rows,), float("-inf"))
    for iteration in range(1, max_iter + 1):
        # E-step under the current parameters; its mean log-likelihood is this iteration's lower bound
        log_prob = model.weighted_log_prob(x)  # [G, K, 2]
        log_norm = log_prob.logsumexp(dim=-1)  # [G, K]
        resp = (log_prob - log_norm[..., None]).exp() * mask[..., None]
        bound = (log_norm * mask).sum(dim=1) / count
        weights, means, variances = _m_step(x, resp, reg_covar)
        keep = active[:, None]
        model.weights = torch.where(keep, weights, model.weights)
        model.means = torch.where(keep, means, model.means)
        model.variances = torch.where(keep, variances, model.variances)
        model.num_iters = torch.where(active, iteration, model.num_iters)
        done = active & ((bound - lower_bound).abs() < tol)
        lower_bound = torch.where(active, bound, lower_bound)
        model.converged |= done
        active &= ~done
        if not bool(active.any()):
            break
    return model
