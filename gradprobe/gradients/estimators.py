"""Estimators over Gram matrices: norms, cosines, shares, unbiased norms, noise scales.

Definitions: docs/metrics.md, "Task gradients". Every quantity is a quadratic form
of the unit Gram matrix G (G[a, b] = <grad_a, grad_b>): a vector built as v = sum_a C[a] grad_a
has <v_i, v_j> = (C G C^T)[i, j]. All functions are pure, float64, and take or return tensors.
"""

from __future__ import annotations

import math

import torch

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def dot_matrix(gram: torch.Tensor, coef: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """<v_i, w_j> = (C G D^T)[i, j] for v = C grads, w = D grads (D defaults to C)."""
    return coef @ gram @ (coef if other is None else other).T


def norms(dots: torch.Tensor) -> torch.Tensor:
    """||v_i|| = sqrt(<v_i, v_i>), clamped at 0 against rounding."""
    return dots.diagonal().clamp_min(0).sqrt()


def cosine_matrix(dots: torch.Tensor) -> torch.Tensor:
    """cos(v_i, v_j) = <v_i, v_j> / (||v_i|| ||v_j||); NaN where a norm is 0."""
    n = norms(dots)
    outer = n[:, None] * n[None, :]
    return torch.where(outer > 0, dots / outer, torch.full_like(dots, float("nan")))


def norm_ratios(task_norms: torch.Tensor) -> torch.Tensor:
    """`norm_ratio`: each norm over the smallest nonzero norm (NaN when all are 0)."""
    positive = task_norms[task_norms > 0]
    if positive.numel() == 0:
        return torch.full_like(task_norms, float("nan"))
    return task_norms / positive.min()


def update_shares(task_dots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """share_t = w_t <g_t, g> / ||g||^2 with g = sum_t w_t g_t; the shares sum to 1."""
    mixed_dots = task_dots @ weights
    total = weights @ mixed_dots
    if total <= 0:
        return torch.full_like(weights, float("nan"))
    return weights * mixed_dots / total


def u_statistic(prompt_gram: torch.Tensor) -> float:
    """Unbiased ||E u||^2 from m per-prompt vectors with Gram K:

        U = (||sum_p u_p||^2 - sum_p ||u_p||^2) / (m (m-1)) = sum_{p != q} K_pq / (m (m-1)).
    """
    m = prompt_gram.shape[0]
    if m < 2:
        return float("nan")
    return float((prompt_gram.sum() - prompt_gram.trace()) / (m * (m - 1)))


def u_statistic_jackknife(prompt_gram: torch.Tensor) -> tuple[float, float]:
    """Delete-one jackknife standard error of `u_statistic`, and the jackknife's bias-free centre.

    U_(-i) drops prompt i: (S - 2 r_i + K_ii - (tr K - K_ii)) / ((m-1)(m-2)), with S = sum K and
    r_i = sum_q K_iq. Var = (m-1)/m sum_i (U_(-i) - mean U_(-i))^2. Needs m >= 3.
    Returns (standard error, mean of the leave-one-out values).
    """
    m = prompt_gram.shape[0]
    if m < 3:
        return float("nan"), float("nan")
    total, trace = prompt_gram.sum(), prompt_gram.trace()
    rows, diag = prompt_gram.sum(1), prompt_gram.diagonal()
    off_diagonal = total - 2 * rows + diag - (trace - diag)
    loo = off_diagonal / ((m - 1) * (m - 2))
    variance = (m - 1) / m * ((loo - loo.mean()) ** 2).sum()
    return float(variance.sqrt()), float(loo.mean())


def noise_trace(prompt_gram: torch.Tensor) -> float:
    """tr(Sigma_u) = (sum_p ||u_p||^2 - m ||mean u||^2) / (m-1)."""
    m = prompt_gram.shape[0]
    if m < 2:
        return float("nan")
    return float((prompt_gram.trace() - prompt_gram.sum() / m) / (m - 1))


def noise_scale(prompt_gram: torch.Tensor) -> float:
    """B_t = tr(Sigma_u) / ||E u||^2 with the unbiased U; NaN when U <= 0 (noise dominates)."""
    signal = u_statistic(prompt_gram)
    if not signal > 0:
        return float("nan")
    return noise_trace(prompt_gram) / signal


def corrected_cosine(cross_dot: float, u_a: float, u_b: float) -> float:
    """g_s.g_t / sqrt(U_s U_t): the cosine with bias-corrected norms; NaN unless both U > 0."""
    if not (u_a > 0 and u_b > 0):
        return float("nan")
    return cross_dot / math.sqrt(u_a * u_b)
