"""Statistics of per-prompt gradient norms against reward, advantage, length and task.

Definitions: docs/metrics.md, "Statistics against reward and advantage" (and "Task
gradients" for u_p, g_t and `norm_ratio`). Pure functions on numpy arrays: no I/O, no printing.
`compute_stats` returns a JSON-ready dict (undefined statistics are None, each with a reason) and
plain verdict sentences, every one built only from numbers in that dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats as sps

from gradprobe.intervals import TaskMoments, ratio_test, u_statistic_interval

COVARIATES = (
    "mean_reward",
    "reward_std",
    "mean_abs_advantage",
    "mean_completion_length",
    "prompt_length",
)
COVARIATE_LABELS = {
    "mean_reward": "reward",
    "reward_std": "reward spread",
    "mean_abs_advantage": "|advantage|",
    "mean_completion_length": "completion length",
    "prompt_length": "prompt length",
}

# Thresholds. Below the MIN_* sizes a statistic is None (with a reason) or a verdict says
# "not enough prompts to tell"; the R^2 thresholds decide the "inherent"/"explained" wording.
MIN_GROUP_N = 3  # usable prompts for a task to enter Kruskal-Wallis, Mann-Whitney, OLS
MIN_SPEARMAN_N = 5  # pairs for a Spearman rho and its Fisher-z interval (needs n > 3)
MIN_OLS_RESID_DF = 5  # residual degrees of freedom an OLS model needs
COLLINEAR_TOLERANCE = 1e-6  # a covariate whose 1 - R^2 on the earlier ones is below this is dropped
MIN_PROMPTS_VERDICT = 10  # prompts per task before a verdict sentence commits to an answer
INHERENT_PARTIAL_R2 = 0.25  # task partial R^2 (and p < alpha) to call the imbalance inherent
SMALL_PARTIAL_R2 = 0.05  # task partial R^2 below this means "the task adds little"
EXPLAINED_R2 = 0.25  # covariate R^2 from which the covariates "explain" the norms
N_REWARD_BINS = 5  # equal-width mean-reward bins
SPEARMAN_SE_FACTOR = 1.06  # Fieller, Hartley & Pearson (1957): SE of atanh(rho) = 1.06/sqrt(n-3)
P_FLOOR = 1e-6  # p-values below it print as "p<1e-6"

SPEARMAN_METHOD = "Fisher z interval, SE 1.06/sqrt(n-3) (Fieller, Hartley & Pearson 1957)"
DOMINANCE_METHOD = (
    "tasks ordered by the U-statistic of ||E u||^2; each pair's norm ratio sqrt(U_a/U_b) with a "
    "Fieller interval and a test of equal squared norms from delete-one-prompt jackknife "
    "variances (tasks independent), Holm-adjusted over all pairs; a task dominates when every "
    "other task is significantly smaller"
)
SINGLE_PROMPT_SHARE = 0.5  # one prompt's share of sum_p ||u_p||^2 that is flagged


@dataclass(frozen=True)
class PromptTable:
    """One entry per prompt (the independent unit), plain numpy columns (metrics.md).

    `grad_norm` is ||u_p||; `reward_std` the population std (ddof=0) of the group's K rewards;
    `degenerate` marks groups whose K rewards are all equal (zero advantage and gradient under
    grpo/dr_grpo/rloo). Degenerate rows are excluded from the per-prompt statistics and counted.
    `prompt_id` (optional) names the prompts in the single-prompt flags (else "#i" in the task).
    """

    task: list[str]
    grad_norm: np.ndarray
    mean_reward: np.ndarray
    reward_std: np.ndarray
    mean_abs_advantage: np.ndarray
    mean_completion_length: np.ndarray
    prompt_length: np.ndarray
    degenerate: np.ndarray
    prompt_id: Sequence[str] | None = None

    def column(self, name: str) -> np.ndarray:
        """The named column as a float64 array (bool for `degenerate`)."""
        dtype = bool if name == "degenerate" else np.float64
        return np.asarray(getattr(self, name), dtype=dtype)


# ---------------------------------------------------------------- small helpers


def _num(x: Any) -> float | None:
    """A finite float, or None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(obj: Any) -> Any:
    """Numpy scalars to Python, non-finite floats to None, tuples to lists (recursively)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _is_constant(x: np.ndarray) -> bool:
    return x.size == 0 or float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.abs(x).max()))


def format_p(p: float | None) -> str:
    """'p<1e-6' below P_FLOOR, 'p=3.2e-04' below 0.001, else 2 significant digits ('p=0.012')."""
    if p is None:
        return "p=n/a"
    if p < P_FLOOR:
        return "p<1e-6"
    if p < 1e-3:
        return f"p={p:.1e}"
    return f"p={p:.2g}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _join(words: Sequence[str]) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ---------------------------------------------------------------- imbalance tests


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in input order (metrics.md: pairwise tests).

    p_holm(i) = max over j <= rank(i) of min(1, (m - j + 1) p_(j)), p_(j) the sorted p-values.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def kruskal_test(groups: Mapping[str, np.ndarray]) -> dict:
    """Kruskal-Wallis H of per-prompt norms by task, p (chi^2, k-1 df), epsilon^2 = H/(n-1).

    Groups with fewer than MIN_GROUP_N values must be left out by the caller (metrics.md).
    """
    out: dict[str, Any] = {"H": None, "p": None, "epsilon_squared": None, "df": None}
    vals = [np.asarray(v, dtype=np.float64) for v in groups.values()]
    out["n"] = int(sum(v.size for v in vals))
    out["tasks"] = list(groups)
    if len(vals) < 2:
        return out | {"reason": "fewer than 2 tasks with enough prompts"}
    if _is_constant(np.concatenate(vals)):
        return out | {"reason": "all norms are tied"}
    res = sps.kruskal(*vals)
    h = float(res.statistic)
    return out | {
        "H": h,
        "p": float(res.pvalue),
        "epsilon_squared": h / (out["n"] - 1),
        "df": len(vals) - 1,
        "reason": None,
    }


def pairwise_mannwhitney(groups: Mapping[str, np.ndarray]) -> list[dict]:
    """Two-sided Mann-Whitney U for each task pair (a, b), Holm-adjusted over pairs (metrics.md).

    U is a's statistic; effect is the rank-biserial r = 2U/(n_a n_b) - 1 = P(a>b) - P(a<b).
    """
    rows = []
    for a, b in combinations(groups, 2):
        x, y = np.asarray(groups[a], float), np.asarray(groups[b], float)
        row: dict[str, Any] = {"a": a, "b": b, "n_a": x.size, "n_b": y.size}
        if _is_constant(np.concatenate([x, y])):
            rows.append(row | {"U": None, "p": None, "effect": None, "reason": "all tied"})
            continue
        res = sps.mannwhitneyu(x, y, alternative="two-sided")
        u = float(res.statistic)
        rows.append(
            row
            | {"U": u, "p": float(res.pvalue), "effect": 2 * u / (x.size * y.size) - 1,
               "reason": None}
        )
    tested = [r for r in rows if r["p"] is not None]
    for r, ph in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = ph
    for r in rows:
        r.setdefault("p_holm", None)
    return rows


# ---------------------------------------------------------------- dominance


def dominance(task_moments: Mapping[str, TaskMoments], alpha: float = 0.05,
              prompt_labels: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Which task's gradient is larger than every other's, tested (docs/metrics.md, dominance).

    Per task, theta_t = ||E u||^2 is estimated by the U-statistic with its jackknife interval
    (`intervals.u_statistic_interval`); tasks with a zero gradient (all prompts degenerate) are
    left out. Tasks are ordered by U; every pair (a above b) gets `intervals.ratio_test`: the
    norm ratio sqrt(U_a/U_b), its Fieller interval and the test of theta_a = theta_b, with
    Holm-adjusted p over all pairs. `leading` is the top task plus every task whose pair with it
    is not significant after Holm (or untested); `dominant` is the top task when it alone leads.
    `single_prompt` flags a prompt holding at least SINGLE_PROMPT_SHARE of its task's
    sum_p ||u_p||^2, and a prompt whose deletion (U_(-p)) changes which task is largest.
    """
    level = 1 - alpha
    fits = {t: u_statistic_interval(mom, level) for t, mom in task_moments.items()}
    live = [t for t, mom in task_moments.items() if np.any(mom.unit_sq_norms > 0)]
    order = sorted(live, key=lambda t: -_value_or(fits[t].value, -math.inf))
    pairs = [_pair(a, b, fits, task_moments, level) for a, b in combinations(order, 2)]
    tested = [r for r in pairs if r["p"] is not None]
    for r, ph in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = ph
    top = order[0] if order else None
    leading = [t for t in order if t == top or not _below(top, t, pairs, alpha)]
    labels = {t: list(prompt_labels[t]) if prompt_labels and t in prompt_labels else
              [f"#{i + 1}" for i in range(mom.n_prompts)] for t, mom in task_moments.items()}
    return {
        "method": DOMINANCE_METHOD, "level": level, "alpha": alpha, "correction": "holm",
        "sources": sorted({mom.source for mom in task_moments.values()}),
        "sketch_dims": sorted({m.sketch_dim for m in task_moments.values() if m.sketch_dim}),
        "tasks": {t: _dominance_task(task_moments[t], fits[t], labels[t], t in live)
                  for t in task_moments},
        "order": order, "pairs": pairs, "tested": bool(tested), "top": top,
        "leading": leading if top else [],
        "dominant": top if len(order) >= 2 and len(leading) == 1 else None,
        "single_prompt": _single_prompt_flags(task_moments, fits, order, labels),
        "reason": _dominance_reason(order, pairs),
    }


def _value_or(x: float | None, default: float) -> float:
    return default if x is None or not math.isfinite(x) else x


def _pair(a: str, b: str, fits: dict, moments: Mapping[str, TaskMoments], level: float) -> dict:
    plain = {t: math.sqrt(max(moments[t].sum_sq_norm, 0.0)) / moments[t].n_prompts for t in (a, b)}
    row = {"a": a, "b": b, **ratio_test(fits[a], fits[b], level), "p_holm": None}
    row["plain_ratio"] = plain[a] / plain[b] if plain[b] > 0 else None
    return row


def _below(top: str, t: str, pairs: list[dict], alpha: float) -> bool:
    """Whether t is significantly smaller than top after Holm, its ratio interval above 1 too
    (the two agree with exact row sums; with sketched ones their df may differ)."""
    row = next(r for r in pairs if r["a"] == top and r["b"] == t)
    return row["p_holm"] is not None and row["p_holm"] < alpha and row["lo"] > 1


def _dominance_task(mom: TaskMoments, fit: Any, labels: list[str], live: bool) -> dict:
    units = mom.unit_sq_norms
    share = units / units.sum() if units.sum() > 0 else np.zeros_like(units)
    top = int(np.argmax(share)) if units.size else None
    return fit.as_dict() | {
        "grad_norm": math.sqrt(max(mom.sum_sq_norm, 0.0)) / max(mom.n_prompts, 1),
        "unbiased_norm": math.sqrt(fit.value) if fit.value is not None and fit.value > 0 else None,
        "max_prompt": None if top is None else labels[top],
        "max_prompt_share": None if top is None else float(share[top]),
        "reason": fit.reason if live else "zero gradient (all prompts degenerate)",
    }


def _single_prompt_flags(moments: Mapping[str, TaskMoments], fits: dict, order: list[str],
                         labels: dict[str, list[str]]) -> list[dict]:
    """Prompts that carry a task's norm: a large share of sum ||u_p||^2, or a deletion that
    changes which task has the largest U (U_(-p) of the top task below the runner-up's U, or
    U_(-p) of another task above the top task's U)."""
    flags = []
    for t in order:
        units = moments[t].unit_sq_norms
        p = int(np.argmax(units))
        if units[p] >= SINGLE_PROMPT_SHARE * units.sum():
            flags.append({"task": t, "prompt": labels[t][p], "kind": "share",
                          "share": float(units[p] / units.sum()), "new_top": None,
                          "u_without": None})
    if len(order) < 2:
        return flags
    top, runner = order[0], order[1]
    for t in order:
        loo = fits[t].delete_one
        if loo is None or fits[t].value is None:
            continue
        if t == top:
            p, beaten = int(np.argmin(loo)), loo.min() < fits[runner].value
            new_top = runner
        else:
            p, beaten = int(np.argmax(loo)), loo.max() > fits[top].value
            new_top = t
        if beaten:
            flags.append({"task": t, "prompt": labels[t][p], "kind": "deletion", "share": None,
                          "new_top": new_top, "u_without": float(loo[p])})
    return flags


def _dominance_reason(order: list[str], pairs: list[dict]) -> str | None:
    if len(order) < 2:
        return "fewer than 2 tasks with a nonzero gradient"
    if not any(r["p"] is not None for r in pairs):
        return pairs[0]["reason"]
    return None


# ---------------------------------------------------------------- associations


def spearman_ci(x: np.ndarray, y: np.ndarray, alpha: float = 0.05) -> dict:
    """Spearman rho and p (scipy.stats.spearmanr) with a Fisher-z interval (metrics.md).

    lo, hi = tanh(atanh(rho) -/+ z_{1-alpha/2} * 1.06 / sqrt(n - 3)).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    out: dict[str, Any] = {"rho": None, "p": None, "lo": None, "hi": None, "n": int(x.size)}
    if x.size < MIN_SPEARMAN_N:
        return out | {"reason": f"fewer than {MIN_SPEARMAN_N} prompts"}
    if _is_constant(x) or _is_constant(y):
        return out | {"reason": "constant input"}
    res = sps.spearmanr(x, y)
    rho = float(res.statistic)
    half = sps.norm.ppf(1 - alpha / 2) * SPEARMAN_SE_FACTOR / math.sqrt(x.size - 3)
    z = math.atanh(min(max(rho, -1 + 1e-15), 1 - 1e-15))
    return out | {"rho": rho, "p": float(res.pvalue), "lo": math.tanh(z - half),
                  "hi": math.tanh(z + half), "reason": None}


# ---------------------------------------------------------------- explained or inherent


def _add_columns(
    x: np.ndarray, cols: Sequence[tuple[str, np.ndarray]]
) -> tuple[np.ndarray, list[str], list[str]]:
    """Append each column not (nearly) a linear function of x; return x, kept names, dropped names.

    A column is dropped when the columns before it explain all but `COLLINEAR_TOLERANCE` of its
    variance (1 - R^2 below it, a variance inflation above 1/COLLINEAR_TOLERANCE): its coefficient
    would be noise. With binary rewards and GRPO advantages, mean |A| is reward_std times a
    constant up to the estimator's epsilon, which an exact rank test lets through.
    """
    kept, dropped = [], []
    for name, c in cols:
        centred = c - c.mean()
        residual = c - x @ np.linalg.lstsq(x, c, rcond=None)[0]
        if float(residual @ residual) > COLLINEAR_TOLERANCE * float(centred @ centred):
            x, kept = np.column_stack([x, c]), kept + [name]
        else:
            dropped.append(name)
    return x, kept, dropped


def _rss(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    return beta, float(((y - x @ beta) ** 2).sum())


def _coefficients(x: np.ndarray, y: np.ndarray, names: list[str]) -> dict:
    """beta, se = sqrt(s^2 diag((X'X)^-1)), t, two-sided p for each column but the intercept."""
    n, k = x.shape
    beta, rss = _rss(x, y)
    s2 = rss / (n - k)
    se = np.sqrt(s2 * np.diag(np.linalg.inv(x.T @ x)))
    out = {}
    for i, name in enumerate(names, start=1):
        t = beta[i] / se[i] if se[i] > 0 else math.inf
        out[name] = {"beta": beta[i], "se": se[i], "t": t, "p": 2 * sps.t.sf(abs(t), n - k)}
    return out


def nested_ols(
    y: np.ndarray, covariates: Mapping[str, np.ndarray], task: Sequence[str]
) -> dict:
    """OLS of y (log ||u_p||) on covariates, then with task indicators (metrics.md).

    R^2 = 1 - RSS/TSS for each model; partial R^2 of task = (RSS_r - RSS_f) / RSS_r;
    F = ((RSS_r - RSS_f)/q) / (RSS_f/(n - p_f)), p = F_sf(q, n - p_f), with q task indicators
    (first task the reference) and p_f columns in the full model. Constant covariates and ones
    collinear with earlier columns are dropped (and named); `r2_task_only` is the task-only model.
    """
    y = np.asarray(y, float)
    task = np.asarray(task, dtype=object)
    n = y.size
    tasks = list(dict.fromkeys(task.tolist()))
    out: dict[str, Any] = dict.fromkeys(
        ["r2_covariates", "r2_task_only", "r2_with_task", "partial_r2_task", "F", "df_num",
         "df_den", "p", "reason", "task_reason"])
    out |= {"n": n, "tasks": tasks, "covariates": [], "dropped_constant": [],
            "dropped_collinear": [], "coefficients": {}}
    few = f"fewer than {MIN_OLS_RESID_DF} residual degrees of freedom"
    if n - 1 < MIN_OLS_RESID_DF:
        out["reason"] = out["task_reason"] = few
        return out
    cols = [(k, np.asarray(v, float)) for k, v in covariates.items()]
    out["dropped_constant"] = [k for k, v in cols if _is_constant(v)]
    cols = [(k, v) for k, v in cols if k not in out["dropped_constant"]]
    x_r, out["covariates"], out["dropped_collinear"] = _add_columns(np.ones((n, 1)), cols)
    tss = float(((y - y.mean()) ** 2).sum())
    if n - x_r.shape[1] < MIN_OLS_RESID_DF:
        out["reason"] = out["task_reason"] = few
        return out
    if tss <= 1e-12 * max(1.0, float(np.abs(y).max())) ** 2 * n:
        out["reason"] = out["task_reason"] = "log norms are constant"
        return out
    _, rss_r = _rss(x_r, y)
    out["r2_covariates"] = 1 - rss_r / tss
    out["coefficients"] = _coefficients(x_r, y, out["covariates"])
    out["task_reason"] = _task_terms(out, y, x_r, rss_r, tss, task, tasks)
    return out


def _task_terms(out: dict, y: np.ndarray, x_r: np.ndarray, rss_r: float, tss: float,
                task: np.ndarray, tasks: list[str]) -> str | None:
    """Fill the task-only and full-model fields of `out`; return a reason when undefined."""
    if len(tasks) < 2:
        return "one task: no task term"
    dummies = [(t, (task == t).astype(float)) for t in tasks[1:]]
    n = y.size
    _, rss_t = _rss(np.column_stack([np.ones(n)] + [d for _, d in dummies]), y)
    out["r2_task_only"] = 1 - rss_t / tss
    x_f, kept, _ = _add_columns(x_r, dummies)
    q, df_den = len(kept), n - x_f.shape[1]
    if q == 0:
        return "task indicators are collinear with the covariates"
    if df_den < MIN_OLS_RESID_DF:
        return f"fewer than {MIN_OLS_RESID_DF} residual degrees of freedom with task terms"
    _, rss_f = _rss(x_f, y)
    out |= {"r2_with_task": 1 - rss_f / tss, "partial_r2_task": (rss_r - rss_f) / rss_r,
            "df_num": q, "df_den": df_den}
    if rss_f <= 1e-12 * tss:
        return "the full model fits exactly"
    f = ((rss_r - rss_f) / q) / (rss_f / df_den)
    out |= {"F": f, "p": float(sps.f.sf(f, q, df_den))}
    return None


# ---------------------------------------------------------------- reward bins


def reward_bins(
    mean_reward: np.ndarray, grad_norm: np.ndarray, task: Sequence[str], usable: np.ndarray,
    n_bins: int = N_REWARD_BINS,
) -> dict:
    """Mean and median ||u_p|| per equal-width mean-reward bin within each task (metrics.md).

    Edges span all prompts' mean rewards; bins are [lo, hi) except the last, [lo, hi].
    n counts usable prompts, n_degenerate the excluded ones (the U-shape check).
    """
    r = np.asarray(mean_reward, float)
    task = np.asarray(task, dtype=object)
    if r.size == 0:
        return {"edges": [], "by_task": {}}
    lo, hi = float(r.min()), float(r.max())
    edges = np.linspace(lo, hi, n_bins + 1) if hi > lo else np.array([lo, hi])
    nb = edges.size - 1
    which = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, nb - 1)
    by_task = {}
    for t in dict.fromkeys(task.tolist()):
        rows = []
        for b in range(nb):
            sel = (task == t) & (which == b)
            vals = np.asarray(grad_norm, float)[sel & usable]
            rows.append({
                "lo": edges[b], "hi": edges[b + 1], "n": int(vals.size),
                "n_degenerate": int((sel & ~usable).sum()),
                "mean_norm": float(vals.mean()) if vals.size else None,
                "median_norm": float(np.median(vals)) if vals.size else None,
            })
        by_task[t] = rows
    return {"edges": edges.tolist(), "by_task": by_task}


# ---------------------------------------------------------------- entry point


def _check(table: PromptTable, task_moments: Mapping[str, TaskMoments]) -> None:
    n = len(table.task)
    for name in ("grad_norm", *COVARIATES, "degenerate"):
        if np.shape(getattr(table, name)) != (n,):
            raise ValueError(f"PromptTable.{name} must have one entry per prompt ({n})")
    for name in COVARIATES:
        if not np.all(np.isfinite(table.column(name))):
            raise ValueError(f"PromptTable.{name} has non-finite values")
    counts = {t: table.task.count(t) for t in dict.fromkeys(table.task)}
    if table.prompt_id is not None and len(table.prompt_id) != n:
        raise ValueError(f"PromptTable.prompt_id must have one entry per prompt ({n})")
    if set(task_moments) != set(counts):
        raise ValueError("task_moments must have exactly one TaskMoments per task in the table")
    for t, m in counts.items():
        if task_moments[t].n_prompts != m:
            raise ValueError(f"task_moments[{t!r}] must have {m} prompts, one per row of the task")


def _by_task(mask: np.ndarray, task: np.ndarray, tasks: list[str]) -> dict:
    per = {t: int((mask & (task == t)).sum()) for t in tasks}
    return {"total": int(mask.sum()), "by_task": per}


def compute_stats(
    table: PromptTable, task_moments: Mapping[str, TaskMoments], alpha: float = 0.05,
) -> dict:
    """All statistics of metrics.md "Statistics against reward and advantage", plus verdicts.

    Usable prompts: not degenerate and 0 < ||u_p|| < inf; the rest are excluded and counted.
    Tasks with at least MIN_GROUP_N usable prompts enter Kruskal-Wallis, Mann-Whitney and the
    OLS; `task_moments[t]` (||S||^2, ||u_p||^2 and r_p in table order, degenerate prompts
    included with zero norms; `intervals.moments_from_gram` builds them from a Gram) gives the
    `dominance` test. Top-level keys: alpha, tasks, tasks_tested, tasks_all_degenerate,
    n_prompts, n_excluded_degenerate, n_excluded_zero_norm, n_usable ({total, by_task}),
    covariate_labels, thresholds, kruskal, pairwise, dominance, spearman, ols, reward_bins,
    verdicts.
    """
    _check(table, task_moments)
    task = np.asarray(table.task, dtype=object)
    tasks = list(dict.fromkeys(table.task))
    norm, degen = table.column("grad_norm"), table.column("degenerate")
    usable = ~degen & np.isfinite(norm) & (norm > 0)
    n_use = {t: int((usable & (task == t)).sum()) for t in tasks}
    tested = [t for t in tasks if n_use[t] >= MIN_GROUP_N]
    groups = {t: norm[usable & (task == t)] for t in tested}
    in_ols = usable & np.isin(task, tested)
    cov = {c: table.column(c) for c in COVARIATES}
    out = {
        "alpha": alpha,
        "tasks": tasks,
        "tasks_tested": tested,
        "tasks_all_degenerate": [t for t in tasks if (degen & (task == t)).sum()
                                 == (task == t).sum()],
        "n_prompts": _by_task(np.ones(task.size, bool), task, tasks),
        "n_excluded_degenerate": _by_task(degen, task, tasks),
        "n_excluded_zero_norm": _by_task(~degen & ~usable, task, tasks),
        "n_usable": _by_task(usable, task, tasks),
        "covariate_labels": dict(COVARIATE_LABELS),
        "thresholds": _thresholds(),
        "kruskal": kruskal_test(groups),
        "pairwise": pairwise_mannwhitney(groups),
        "dominance": dominance({t: task_moments[t] for t in tasks}, alpha, _labels(table, tasks)),
        "spearman": _spearman_all(norm, cov, task, usable, tasks, alpha),
        "ols": nested_ols(np.log(norm[in_ols]), {c: v[in_ols] for c, v in cov.items()},
                          task[in_ols].tolist()),
        "reward_bins": reward_bins(cov["mean_reward"], norm, table.task, usable),
    }
    out = _jsonable(out)
    out["verdicts"] = verdicts(out)
    return out


def _labels(table: PromptTable, tasks: list[str]) -> dict[str, list[str]] | None:
    if table.prompt_id is None:
        return None
    return {t: [str(i) for i, k in zip(table.prompt_id, table.task) if k == t] for t in tasks}


def _thresholds() -> dict:
    return {
        "MIN_GROUP_N": MIN_GROUP_N, "MIN_SPEARMAN_N": MIN_SPEARMAN_N,
        "MIN_OLS_RESID_DF": MIN_OLS_RESID_DF, "MIN_PROMPTS_VERDICT": MIN_PROMPTS_VERDICT,
        "INHERENT_PARTIAL_R2": INHERENT_PARTIAL_R2, "SMALL_PARTIAL_R2": SMALL_PARTIAL_R2,
        "EXPLAINED_R2": EXPLAINED_R2, "N_REWARD_BINS": N_REWARD_BINS,
        "SINGLE_PROMPT_SHARE": SINGLE_PROMPT_SHARE,
    }


def _spearman_all(norm: np.ndarray, cov: dict, task: np.ndarray, usable: np.ndarray,
                  tasks: list[str], alpha: float) -> dict:
    pooled = {c: spearman_ci(norm[usable], v[usable], alpha) for c, v in cov.items()}
    within = {}
    for t in tasks:
        sel = usable & (task == t)
        within[t] = {c: spearman_ci(norm[sel], v[sel], alpha) for c, v in cov.items()}
    return {"method": SPEARMAN_METHOD, "pooled": pooled, "within": within}


# ---------------------------------------------------------------- verdicts


def verdicts(stats: dict) -> list[str]:
    """Plain sentences, each built only from numbers in `stats` (the dict compute_stats makes).

    Below MIN_PROMPTS_VERDICT prompts per task a sentence says "not enough prompts to tell".
    """
    if stats["n_prompts"]["total"] == 0:
        return ["No prompts to analyse."]
    out = _degenerate_sentences(stats)
    tasks = stats["tasks"]
    live = [t for t in tasks if t not in stats["tasks_all_degenerate"]]
    if len(live) < 2:
        which = f"Only one task ({tasks[0]})" if len(tasks) == 1 else "Fewer than two tasks"
        out.append(f"{which} with usable prompts: no comparison across tasks (Kruskal-Wallis, "
                   "pairwise tests and the task F-test are skipped).")
    else:
        out.append(dominance_sentence(stats["dominance"]))
        out.append(_kruskal_sentence(stats))
    out += single_prompt_sentences(stats["dominance"])
    out += [_ols_sentence(stats), *_advantage_sentences(stats)]
    return [s for s in out if s]


def _degenerate_sentences(stats: dict) -> list[str]:
    n, d = stats["n_prompts"], stats["n_excluded_degenerate"]
    out = []
    if d["total"]:
        per = ", ".join(f"{t} {k}" for t, k in d["by_task"].items() if k)
        out.append(f"{d['total']} of {n['total']} prompts ({_pct(d['total'] / n['total'])}) "
                   f"were degenerate (all rewards equal, zero gradient) and are excluded: {per}.")
    for t in stats["tasks_all_degenerate"]:
        out.append(f"{t} has no usable prompt (all {n['by_task'][t]} degenerate): its gradient "
                   "is zero and it is left out of the comparisons.")
    return out


def _few(stats: dict, tasks: Sequence[str] | None = None, key: str = "n_usable") -> list[str]:
    """Tasks (default: all but the all-degenerate ones) below MIN_PROMPTS_VERDICT prompts."""
    if tasks is None:
        tasks = [t for t in stats["tasks"] if t not in stats["tasks_all_degenerate"]]
    return [t for t in tasks if stats[key]["by_task"][t] < MIN_PROMPTS_VERDICT]


def _find_pair(dom: dict, a: str, b: str) -> dict:
    return next(r for r in dom["pairs"] if r["a"] == a and r["b"] == b)


def _times(pair: dict) -> str:
    if pair["ratio"] is None:
        return "an undefined multiple (U <= 0) of"
    return f"{pair['ratio']:.2f}x"


def _interval_text(pair: dict, level: float) -> str:
    """'95% CI 1.8-2.6, Holm p=0.001', or why there is none."""
    if pair["lo"] is None:
        return f"no interval: {pair['reason']}"
    hi = "unbounded" if pair["hi"] is None else f"{pair['hi']:.2f}"
    holm_p = "" if pair["p_holm"] is None else f", Holm {format_p(pair['p_holm'])}"
    return f"{100 * level:g}% CI {pair['lo']:.2f}-{hi}{holm_p}"


def dominance_sentence(dom: dict) -> str:
    """One sentence from `dominance(...)`: "X dominates" only when every other task is
    significantly smaller after Holm; else which tasks lead together, or that the largest is
    not significantly so, or (no row sums) untested. The unbiased gradient norm is sqrt(U) and
    ratios are sqrt(U_a / U_b)."""
    order, top = dom["order"], dom["top"]
    if len(order) < 2:
        return f"No comparison of task gradients ({dom['reason']})."
    runner, smallest, level = order[1], order[-1], dom["level"]
    to_runner, to_smallest = _find_pair(dom, top, runner), _find_pair(dom, top, smallest)
    if not dom["tested"]:
        return (f"{top} has the largest unbiased gradient norm, {_times(to_smallest)} "
                f"{smallest}'s; untested ({dom['reason']}).")
    if dom["dominant"]:
        s = (f"{top} dominates: its unbiased gradient norm is {_times(to_runner)} {runner}'s, "
             f"the next largest ({_interval_text(to_runner, level)})")
        if smallest != runner:
            s += f", and {_times(to_smallest)} {smallest}'s ({_interval_text(to_smallest, level)})"
        return s + "."
    leading = dom["leading"]
    if len(leading) < len(order):
        return (f"{_join(leading)} lead together (their differences are not significant after "
                f"Holm); {top}'s unbiased gradient norm is {_times(to_smallest)} {smallest}'s "
                f"({_interval_text(to_smallest, level)}).")
    return (f"{top} has the largest unbiased gradient norm, not significantly: "
            f"{_times(to_runner)} {runner}'s ({_interval_text(to_runner, level)}); no task is "
            "significantly smaller after Holm.")


def single_prompt_sentences(dom: dict) -> list[str]:
    """One sentence per kind of `dominance(...)["single_prompt"]` flag."""
    out = []
    shares = [f for f in dom["single_prompt"] if f["kind"] == "share"]
    if shares:
        parts = [f"{f['task']} ({f['prompt']}, {_pct(f['share'])})" for f in shares]
        out.append(f"One prompt carries most of its task's summed squared prompt norms in "
                   f"{_join(parts)}: that task's gradient rests on one prompt.")
    for f in (f for f in dom["single_prompt"] if f["kind"] == "deletion"):
        if f["task"] == dom["top"]:
            out.append(f"Without prompt {f['prompt']} of {f['task']}, {f['new_top']} would have "
                       "the largest unbiased gradient norm: one prompt decides which task is "
                       "largest.")
        else:
            out.append(f"Without prompt {f['prompt']} of {f['task']}, {f['task']} would have "
                       "the largest unbiased gradient norm: one prompt decides which task is "
                       "largest.")
    return out


def _kruskal_sentence(stats: dict) -> str:
    kw = stats["kruskal"]
    few = _few(stats)
    if kw["H"] is None or few or len(stats["tasks_tested"]) < 2:
        why = kw["reason"] or f"fewer than {MIN_PROMPTS_VERDICT} usable prompts in {_join(few)}"
        return f"Not enough prompts to tell whether per-prompt norms differ across tasks ({why})."
    nums = (f"Kruskal-Wallis H={kw['H']:.1f}, {format_p(kw['p'])}, "
            f"epsilon^2={kw['epsilon_squared']:.2f}")
    if kw["p"] >= stats["alpha"]:
        return f"Per-prompt norms do not differ detectably across tasks ({nums})."
    s = f"Per-prompt norms differ across tasks ({nums})"
    alpha = stats["alpha"]
    sig = [r for r in stats["pairwise"] if r["p_holm"] is not None and r["p_holm"] < alpha]
    if sig:
        pairs = [f"{r['a']}>{r['b']}" if r["effect"] > 0 else f"{r['b']}>{r['a']}" for r in sig]
        s += f"; pairs significant after Holm: {', '.join(pairs)}"
    return s + "."


def _ols_sentence(stats: dict) -> str:
    o, alpha = stats["ols"], stats["alpha"]
    few = _few(stats)
    if o["r2_covariates"] is None or few:
        why = o["reason"] or f"fewer than {MIN_PROMPTS_VERDICT} usable prompts in {_join(few)}"
        return f"Not enough prompts to tell what explains the per-prompt norms ({why})."
    labels = [stats["covariate_labels"][c] for c in o["covariates"]]
    head = (f"{_join(labels)} explain {_pct(o['r2_covariates'])} of the per-prompt variation in "
            "log norm" if labels else "No covariate varies")
    head = head[0].upper() + head[1:]
    if len(o["tasks"]) < 2:
        return head + " (one task: no task term)."
    if o["F"] is None:
        return head + f"; the task term could not be tested ({o['task_reason']})."
    task = (f"(partial R^2; F={o['F']:.1f}, {format_p(o['p'])})")
    sig, part = o["p"] < alpha, o["partial_r2_task"]
    if sig and part >= INHERENT_PARTIAL_R2:
        return (f"{head}; the task explains a further {_pct(part)} of the rest {task}: "
                "the imbalance is inherent to the tasks.")
    if (not sig or part < SMALL_PARTIAL_R2) and o["r2_covariates"] >= EXPLAINED_R2:
        return (f"{head}; the task alone explains {_pct(o['r2_task_only'])} but adds only "
                f"{_pct(part)} beyond them {task}: the differences are explained by "
                f"{_explainers(stats)}.")
    if not sig:
        return (f"{head}; the task adds {_pct(part)} {task}: neither explains much of the "
                "per-prompt variation.")
    return (f"{head}; the task adds {_pct(part)} {task}: the task matters beyond these "
            f"statistics, but its share is below {_pct(INHERENT_PARTIAL_R2)}.")


def _explainers(stats: dict) -> str:
    coef = stats["ols"]["coefficients"]
    sig = [c for c in coef if coef[c]["p"] is not None and coef[c]["p"] < stats["alpha"]]
    sig.sort(key=lambda c: -abs(coef[c]["t"] or 0))
    if not sig:
        return "the covariates jointly"
    return _join([f"{stats['covariate_labels'][c]} (t={coef[c]['t']:.1f})" for c in sig])


def _advantage_sentences(stats: dict) -> list[str]:
    sp, alpha, c = stats["spearman"], stats["alpha"], "mean_abs_advantage"
    parts = {"rises": [], "falls": [], "flat": []}
    for t in stats["tasks"]:
        r = sp["within"][t][c]
        if r["rho"] is None or stats["n_usable"]["by_task"][t] < MIN_PROMPTS_VERDICT:
            continue
        key = "flat" if r["p"] >= alpha else ("rises" if r["rho"] > 0 else "falls")
        ci = f"{t} (rho={r['rho']:.2f}, CI {r['lo']:.2f} to {r['hi']:.2f}"
        parts[key].append(ci + (f", {format_p(r['p'])})" if key == "flat" else ")"))
    if not any(parts.values()):
        return ["Not enough prompts to tell how the norm relates to |advantage| within a task."]
    words = {"rises": "rises with |advantage| in", "falls": "falls with |advantage| in",
             "flat": "shows no detectable association with |advantage| in"}
    s = "Within tasks, the norm " + "; ".join(
        f"{words[k]} {_join(v)}" for k, v in parts.items() if v) + "."
    pooled = sp["pooled"][c]
    if pooled["rho"] is not None and len(stats["tasks"]) > 1:
        s += f" Pooled across tasks, rho={pooled['rho']:.2f} ({format_p(pooled['p'])})."
    return [s]
