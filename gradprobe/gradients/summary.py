"""The gradient stage's plain-data result: per-task, per-prompt and per-module figures.

Turns the engine's streaming reductions (prompt Grams of sign units, sign-sum dots, row dots)
into every "Task gradients" quantity of docs/metrics.md, with the formulas in `estimators`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradprobe.gradients import estimators as est
from gradprobe.gradients.engine import UnitGradients
from gradprobe.gradients.layout import UnitLayout
from gradprobe.intervals import TaskMoments, u_statistic_interval



@dataclass
class GradientSummary:
    """Per-task figures (dicts keyed by task), cosines, per-prompt norms, per-module parts."""

    tasks: dict[str, dict[str, Any]]
    cosine: list[list[float | None]]
    cosine_unbiased: list[list[float | None]]
    mixed: dict[str, float]
    prompt_grad_norm: np.ndarray
    task_moments: dict[str, TaskMoments]
    """Per task, in prompt order: ||S_t||^2, each ||u_p||^2 and the row sums (the statistics' input)."""
    modules: dict[str, dict[str, Any]]


def _finite(value: float) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _matrix(values: torch.Tensor) -> list[list[float | None]]:
    return [[_finite(v) for v in row] for row in values.tolist()]


def _sign_to_task(n_tasks: int) -> torch.Tensor:
    """[T, 2T]: g_t = g_t+ + g_t- from the sign sums' rows 2t, 2t+1."""
    combine = torch.zeros((n_tasks, 2 * n_tasks), dtype=torch.float64)
    for t in range(n_tasks):
        combine[t, 2 * t] = combine[t, 2 * t + 1] = 1.0
    return combine


def _core_figures(prompt_gram: torch.Tensor, sign_dots: torch.Tensor, row_dots: torch.Tensor | None,
                  layout: UnitLayout, source: str = "none", sketch_dim: int | None = None) -> dict[str, Any]:
    """Norms, U-statistics and per-task moments of one parameter set (all selected parameters,
    or one module group) from its prompt Grams [P, 2, 2], sign-sum dots [2T, 2T] and the units'
    row dots (`source` says how those were obtained: exact, sketch, or none when absent)."""
    n_tasks = len(layout.tasks)
    combine = _sign_to_task(n_tasks)
    task_dots = combine @ sign_dots @ combine.T
    unit_sq = prompt_gram.sum((1, 2))
    prompt_rows = None if row_dots is None else row_dots.view(-1, 2).sum(1)  # <u_p, g_t>
    task_norms = est.norms(task_dots)
    moments = []
    for t in range(n_tasks):
        mine = torch.as_tensor(np.flatnonzero(layout.prompt_task == t))
        m = len(mine)
        moments.append(TaskMoments(
            sum_sq_norm=float(task_dots[t, t]) * m * m,  # ||S_t||^2 = m^2 ||g_t||^2
            unit_sq_norms=unit_sq[mine].numpy(),
            row_sums=None if prompt_rows is None else (m * prompt_rows[mine]).numpy(),  # <u_p, m g_t>
            source=source if prompt_rows is not None else "none",
            sketch_dim=sketch_dim if prompt_rows is not None and source == "sketch" else None,
        ))
    return {
        "task_dots": task_dots,
        "sign_dots": sign_dots,
        "moments": moments,
        "unit_sq": unit_sq,
        "grad_sq_norm": task_dots.diagonal(),
        "grad_norm": task_norms,
        "norm_ratio": est.norm_ratios(task_norms),
        "unbiased": [est.u_statistic(mo.sum_sq_norm, torch.as_tensor(mo.unit_sq_norms)) for mo in moments],
    }


def summarise_gradients(result: UnitGradients, layout: UnitLayout) -> GradientSummary:
    """Every per-task, per-prompt and per-module gradient figure of a scan.

    `result` must come from an engine run with `layout.reductions()`.
    """
    n_tasks = len(layout.tasks)
    if result.row_dots is not None:
        row_dots, source = result.row_dots.sum(0), "exact"
    elif result.sketched_row_dots is not None:
        row_dots, source = result.sketched_row_dots, "sketch"
    else:
        row_dots, source = None, "none"
    core = _core_figures(result.total_prompt_gram(), result.sum_dots.sum(0), row_dots, layout, source,
                         result.sketch_dim)
    weights = torch.as_tensor(layout.task_weights, dtype=torch.float64)
    shares = est.update_shares(core["task_dots"], weights)
    sign_dots = core["sign_dots"]
    tasks: dict[str, dict[str, Any]] = {}
    for t, name in enumerate(layout.tasks):
        moments = core["moments"][t]
        unbiased = core["unbiased"][t]
        interval = u_statistic_interval(moments)  # the same interval the statistics use
        pos_sq, neg_sq = float(sign_dots[2 * t, 2 * t]), float(sign_dots[2 * t + 1, 2 * t + 1])
        pos, neg = max(pos_sq, 0.0) ** 0.5, max(neg_sq, 0.0) ** 0.5
        pos_neg = float(sign_dots[2 * t, 2 * t + 1])
        tasks[name] = {
            "grad_norm": _finite(core["grad_norm"][t]),
            "grad_sq_norm": _finite(core["grad_sq_norm"][t]),
            "norm_ratio": _finite(core["norm_ratio"][t]),
            "share": _finite(shares[t]),
            "mix_weight": float(weights[t]),
            "grad_sq_norm_unbiased": _finite(unbiased),
            "grad_sq_norm_unbiased_se": _finite(interval.se) if interval.se is not None else None,
            "grad_sq_norm_unbiased_ci": [None if v is None else _finite(v) for v in (interval.lo, interval.hi)],
            "noise_trace": _finite(est.noise_trace(moments.sum_sq_norm, torch.as_tensor(moments.unit_sq_norms))),
            "noise_scale": _finite(est.noise_scale(moments.sum_sq_norm, torch.as_tensor(moments.unit_sq_norms))),
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
        prompt_grad_norm=core["unit_sq"].clamp_min(0).sqrt().numpy(),
        task_moments={name: core["moments"][t] for t, name in enumerate(layout.tasks)},
        modules=_module_breakdown(result, layout, [_finite(v) for v in core["grad_norm"]]),
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


def _module_breakdown(result: UnitGradients, layout: UnitLayout,
                      full_norms: list[float | None]) -> dict[str, dict[str, Any]]:
    """Per module group: its size, each task's norms restricted to it, and its proxy fidelity."""
    out = {}
    for g, group in enumerate(result.groups):
        row_dots = None if result.row_dots is None else result.row_dots[g]
        core = _core_figures(result.prompt_gram[g], result.sum_dots[g], row_dots, layout, "exact")
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
