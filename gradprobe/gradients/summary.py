"""The gradient stage's plain-data result: per-task, per-prompt and per-module figures.

Turns the engine's unit Gram matrices into every "Task gradients" quantity of docs/metrics.md, with
the estimator formulas in `estimators`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradprobe.gradients import estimators as est
from gradprobe.gradients.engine import UnitGradients
from gradprobe.gradients.layout import UnitLayout

CI_METHOD = "delete-one-prompt jackknife, normal 95% interval"


@dataclass
class GradientSummary:
    """Per-task figures (dicts keyed by task), cosines, per-prompt norms, per-module parts."""

    tasks: dict[str, dict[str, Any]]
    cosine: list[list[float | None]]
    cosine_unbiased: list[list[float | None]]
    mixed: dict[str, float]
    prompt_grad_norm: np.ndarray
    prompt_gram: dict[str, np.ndarray]
    modules: dict[str, dict[str, Any]]


def _finite(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _matrix(values: torch.Tensor) -> list[list[float | None]]:
    return [[_finite(v) for v in row] for row in values.tolist()]


def _core_figures(block_grams: list[torch.Tensor], task_dots: torch.Tensor,
                  parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Norms, U-statistics and per-prompt Grams from one parameter set's (total or one module
    group's) within-task unit Grams and task-gradient dot products; `parts` are the tasks'
    `layout.block_coefficients`."""
    blocks = [est.dot_matrix(g, to_prompts) for g, (to_prompts, _, _) in zip(block_grams, parts)]
    task_norms = est.norms(task_dots)
    return {
        "task_dots": task_dots,
        "blocks": blocks,
        "grad_sq_norm": task_dots.diagonal(),
        "grad_norm": task_norms,
        "norm_ratio": est.norm_ratios(task_norms),
        "unbiased": [est.u_statistic(b) for b in blocks],
    }


def summarise_gradients(result: UnitGradients, layout: UnitLayout) -> GradientSummary:
    """Every per-task, per-prompt and per-module gradient figure of a scan.

    `result` must come from an engine run with the tasks as blocks (`layout.task_units()`) and
    the task matrix as the first rows of its sums (`layout.task_matrix()`).
    """
    n_tasks = len(layout.tasks)
    parts = [layout.block_coefficients(t) for t in range(n_tasks)]
    core = _core_figures([result.total(b) for b in range(len(result.blocks))],
                         result.sum_dots.sum(0)[:n_tasks, :n_tasks], parts)
    weights = torch.as_tensor(layout.task_weights, dtype=torch.float64)
    shares = est.update_shares(core["task_dots"], weights)
    tasks: dict[str, dict[str, Any]] = {}
    for t, name in enumerate(layout.tasks):
        block = core["blocks"][t]
        se, _ = est.u_statistic_jackknife(block)
        unbiased = core["unbiased"][t]
        _, pos_coef, neg_coef = parts[t]
        unit_gram = result.total(t)
        pos_sq, neg_sq = float(pos_coef @ unit_gram @ pos_coef), float(neg_coef @ unit_gram @ neg_coef)
        pos, neg = max(pos_sq, 0.0) ** 0.5, max(neg_sq, 0.0) ** 0.5
        pos_neg = float(pos_coef @ unit_gram @ neg_coef)
        tasks[name] = {
            "grad_norm": _finite(core["grad_norm"][t]),
            "grad_sq_norm": _finite(core["grad_sq_norm"][t]),
            "norm_ratio": _finite(core["norm_ratio"][t]),
            "share": _finite(shares[t]),
            "mix_weight": float(weights[t]),
            "grad_sq_norm_unbiased": _finite(unbiased),
            "grad_sq_norm_unbiased_se": _finite(se),
            "grad_sq_norm_unbiased_ci": [_finite(unbiased - est.Z_95 * se), _finite(unbiased + est.Z_95 * se)],
            "noise_trace": _finite(est.noise_trace(block)),
            "noise_scale": _finite(est.noise_scale(block)),
            "pos_grad_norm": pos,
            "neg_grad_norm": neg,
            "pos_neg_ratio": _finite(pos / neg) if neg > 0 else None,
            "pos_neg_cosine": _finite(pos_neg / (pos * neg)) if pos > 0 and neg > 0 else None,
        }
    corrected = torch.full((n_tasks, n_tasks), float("nan"), dtype=torch.float64)
    for s in range(n_tasks):
        for t in range(n_tasks):
            if s != t:
                corrected[s, t] = est.corrected_cosine(
                    float(core["task_dots"][s, t]), core["unbiased"][s], core["unbiased"][t]
                )
    mixed_sq = float(weights @ core["task_dots"] @ weights)
    return GradientSummary(
        tasks=tasks,
        cosine=_matrix(est.cosine_matrix(core["task_dots"])),
        cosine_unbiased=_matrix(corrected),
        mixed={"grad_norm": float(np.sqrt(max(mixed_sq, 0.0))), "grad_sq_norm": mixed_sq},
        prompt_grad_norm=torch.cat([est.norms(b) for b in core["blocks"]]).numpy(),
        prompt_gram={name: core["blocks"][t].numpy() for t, name in enumerate(layout.tasks)},
        modules=_module_breakdown(result, layout, parts, [_finite(v) for v in core["grad_norm"]]),
    )


def proxy_fidelity(proxy_norms: list[float | None], full_norms: list[float | None]) -> dict[str, Any]:
    """How well a parameter subset ranks tasks like the full model (docs/metrics.md, per-module).

    `spearman`: rank correlation across tasks of the two grad_norm vectors (None below 3 tasks
    or when either is constant); `max_ratio_error`: max_t |r_t(proxy) - r_t(full)| / r_t(full),
    with r_t the norm_ratio (norm over the smallest nonzero norm) under each parameter set.
    """
    from scipy.stats import spearmanr

    pairs = [(p, f) for p, f in zip(proxy_norms, full_norms) if p and f]
    out: dict[str, Any] = {"n_tasks": len(pairs), "spearman": None, "max_ratio_error": None}
    if len(pairs) >= 2:
        proxy, full = np.array(pairs).T
        proxy_ratio, full_ratio = proxy / proxy.min(), full / full.min()
        out["max_ratio_error"] = float(np.max(np.abs(proxy_ratio - full_ratio) / full_ratio))
    if len(pairs) >= 3 and np.ptp(np.array(pairs)[:, 0]) > 0 and np.ptp(np.array(pairs)[:, 1]) > 0:
        out["spearman"] = float(spearmanr(*np.array(pairs).T).statistic)
    return out


def _module_breakdown(result: UnitGradients, layout: UnitLayout, parts: list,
                      full_norms: list[float | None]) -> dict[str, dict[str, Any]]:
    """Per module group: its size, each task's norms restricted to it, and its proxy fidelity."""
    out = {}
    n_tasks = len(layout.tasks)
    for g, group in enumerate(result.groups):
        core = _core_figures([gram[g] for gram in result.block_gram],
                             result.sum_dots[g, :n_tasks, :n_tasks], parts)
        out[group] = {
            "n_parameters": result.group_sizes[g],
            "proxy_fidelity": proxy_fidelity([_finite(v) for v in core["grad_norm"]], full_norms),
            "tasks": {
                name: {
                    "grad_norm": _finite(core["grad_norm"][t]),
                    "grad_sq_norm": _finite(core["grad_sq_norm"][t]),
                    "norm_ratio": _finite(core["norm_ratio"][t]),
                    "grad_sq_norm_unbiased": _finite(core["unbiased"][t]),
                }
                for t, name in enumerate(layout.tasks)
            },
        }
    return out
