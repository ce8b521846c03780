"""Estimators over Gram matrices: norms, cosines, shares, unbiased norms, noise scales.

Definitions: docs/metrics.md, "Task gradients". Every quantity is a function of what one
streaming pass knows exactly (docs/engine.md): the dot products of the task sums, each prompt's
squared norm ||u_p||^2 (the intervals, which also need the row sums r_p = <u_p, S_t>, are in
`gradprobe.intervals`). All functions are pure, float64, and take or return tensors.
"""

from __future__ import annotations

import math

import torch



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


def u_statistic(sum_sq: float, unit_sq: torch.Tensor) -> float:
    """Unbiased ||E u||^2 from m per-prompt vectors u_p with S = sum_p u_p:

        U = (||S||^2 - sum_p ||u_p||^2) / (m (m-1)) = sum_{p != q} <u_p, u_q> / (m (m-1)).
    """
    m = unit_sq.shape[0]
    if m < 2:
        return float("nan")
    return float((sum_sq - unit_sq.sum()) / (m * (m - 1)))


def noise_trace(sum_sq: float, unit_sq: torch.Tensor) -> float:
    """tr(Sigma_u) = (sum_p ||u_p||^2 - m ||mean u||^2) / (m-1), with m ||mean u||^2 = ||S||^2 / m."""
    m = unit_sq.shape[0]
    if m < 2:
        return float("nan")
    return float((unit_sq.sum() - sum_sq / m) / (m - 1))


def noise_scale(sum_sq: float, unit_sq: torch.Tensor) -> float:
    """B_t = tr(Sigma_u) / ||E u||^2 with the unbiased U; NaN when U <= 0 (noise dominates)."""
    signal = u_statistic(sum_sq, unit_sq)
    if not signal > 0:
        return float("nan")
    return noise_trace(sum_sq, unit_sq) / signal


def corrected_cosine(cross_dot: float, u_a: float, u_b: float) -> float:
    """g_s.g_t / sqrt(U_s U_t): the cosine with bias-corrected norms; NaN unless both U > 0."""
    if not (u_a > 0 and u_b > 0):
        return float("nan")
    return cross_dot / math.sqrt(u_a * u_b)
