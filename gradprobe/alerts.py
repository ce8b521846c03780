"""`--fail-on` conditions for CI: a tiny expression language over named metrics.

An expression is ``NAME OP NUMBER`` or ``NAME[TASK] OP NUMBER``, with OP one of
``> >= < <= == !=``; ``NAME[*]`` checks every task. Examples: ``max_norm_ratio>8``,
``min_cosine<-0.2``, ``share[code]>0.6``, ``degenerate_fraction[math]>0.5``.

Names come from a registry per document kind: `SCAN_METRICS` for a scan (report) and
`COMPARE_METRICS` for a comparison. Every metric reads its value from the document, so a check
gives the same answer on a saved scan as on a fresh one. A metric whose value is undefined (None:
a single task has no cosine, say) does not fire; the check says so. Definitions of the numbers:
docs/metrics.md.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradprobe.errors import UserInputError

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}
_EXPRESSION = re.compile(
    r"^\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(?:\[(?P<index>[^\]]*)\])?\s*"
    r"(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>\S+)\s*$"
)

Getter = Callable[[dict[str, Any], str | None], float | None]


@dataclass(frozen=True)
class Metric:
    """A named number of a document; `indexed` ones take a task name."""

    name: str
    description: str
    get: Getter
    indexed: bool = False

    @property
    def signature(self) -> str:
        return f"{self.name}[TASK]" if self.indexed else self.name


class MetricRegistry:
    """Metric names of one document kind, registered with `scalar` and `per_task`.

    A name may have both forms: ``min_cosine`` (over all pairs) and ``min_cosine[TASK]``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.scalars: dict[str, Metric] = {}
        self.indexed: dict[str, Metric] = {}

    def scalar(self, name: str, description: str) -> Callable[[Getter], Getter]:
        def register(fn: Getter) -> Getter:
            self.scalars[name] = Metric(name, description, fn, indexed=False)
            return fn
        return register

    def per_task(self, name: str, description: str) -> Callable[[Getter], Getter]:
        def register(fn: Getter) -> Getter:
            self.indexed[name] = Metric(name, description, fn, indexed=True)
            return fn
        return register

    @property
    def metrics(self) -> list[Metric]:
        return [*self.scalars.values(), *self.indexed.values()]

    def signatures(self) -> list[str]:
        return [m.signature for m in self.metrics]


@dataclass(frozen=True)
class Condition:
    """One parsed `--fail-on` expression."""

    expression: str
    metric: Metric
    index: str | None
    op: str
    threshold: float


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def parse(expression: str, registry: MetricRegistry, tasks: list[str]) -> Condition:
    """A Condition, or a UserInputError naming what is wrong and the valid names or tasks."""
    match = _EXPRESSION.match(expression)
    if match is None:
        raise UserInputError(
            f"--fail-on {expression!r}: not an expression; write NAME OP NUMBER or NAME[TASK] OP "
            f"NUMBER with OP one of {' '.join(OPERATORS)}, e.g. max_norm_ratio>8 or share[code]>0.6"
        )
    name, index, op, raw = match["name"], match["index"], match["op"], match["value"]
    if name not in registry.scalars and name not in registry.indexed:
        raise UserInputError(
            f"--fail-on {expression!r}: unknown metric {name!r} for {registry.kind}; valid names: "
            f"{', '.join(registry.signatures())}"
        )
    if index is None and name not in registry.scalars:
        raise UserInputError(f"--fail-on {expression!r}: {name} is per task; write {name}[TASK] "
                             f"(tasks: {', '.join(tasks)}) or {name}[*] for every task")
    if index is not None and name not in registry.indexed:
        raise UserInputError(f"--fail-on {expression!r}: {name} takes no [TASK]; per-task names: "
                             f"{', '.join(m.signature for m in registry.indexed.values())}")
    metric = registry.scalars[name] if index is None else registry.indexed[name]
    if index is not None:
        index = index.strip().strip("'\"")
        if index != "*" and index not in tasks:
            raise UserInputError(f"--fail-on {expression!r}: no task {index!r}; tasks: {', '.join(tasks)}")
    try:
        threshold = float(raw)
    except ValueError:
        threshold = math.nan
    if math.isnan(threshold):
        raise UserInputError(f"--fail-on {expression!r}: {raw!r} is not a number")
    return Condition(expression.strip(), metric, index, op, threshold)


def evaluate(conditions: list[Condition], document: dict[str, Any], tasks: list[str]) -> list[dict[str, Any]]:
    """One check per condition and task (all tasks for ``[*]``): value, fired, message.

    fired = value OP threshold; an undefined value (None) never fires.
    """
    checks = []
    for condition in conditions:
        indices = tasks if condition.index == "*" else [condition.index]
        for index in indices:
            value = _number(condition.metric.get(document, index))
            fired = value is not None and OPERATORS[condition.op](value, condition.threshold)
            label = condition.metric.name + (f"[{index}]" if index is not None else "")
            shown = "undefined" if value is None else f"{value:.4g}"
            checks.append({
                "expression": condition.expression,
                "metric": condition.metric.name,
                "index": index,
                "operator": condition.op,
                "threshold": condition.threshold,
                "value": value,
                "fired": fired,
                "message": f"{label} = {shown} {condition.op} {condition.threshold:g}" if fired else
                           f"{label} = {shown}: " + ("undefined, does not fire" if value is None
                                                     else f"ok against {condition.expression}"),
            })
    return checks


def run_checks(expressions: list[str], registry: MetricRegistry, document: dict[str, Any],
               tasks: list[str]) -> list[dict[str, Any]]:
    """Parse every expression first (so a typo fails before anything is reported), then evaluate."""
    conditions = [parse(e, registry, tasks) for e in expressions]
    return evaluate(conditions, document, tasks)


# --- scan metrics (report) ---------------------------------------------------------------------

SCAN_METRICS = MetricRegistry("a scan")


def _task_values(document: dict[str, Any], key: str) -> list[float]:
    return [v for v in (_number(t.get(key)) for t in document["tasks"].values()) if v is not None]


def _off_diagonal(cosine: dict[str, Any], task: str | None = None) -> list[float]:
    names, matrix = cosine["tasks"], cosine["matrix"]
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row)
            if i != j and v is not None and (task is None or names[i] == task)]


def _extreme(values: list[float], pick: Callable[[list[float]], float]) -> float | None:
    return pick(values) if values else None


def _over_tasks(key: str, pick: Callable[[list[float]], float]) -> Getter:
    """The largest or smallest of a per-task field (None when no task has a number there)."""
    return lambda doc, _: _extreme(_task_values(doc, key), pick)


_max_norm_ratio = SCAN_METRICS.scalar(
    "max_norm_ratio", "largest task grad_norm over the smallest nonzero one")(_over_tasks("norm_ratio", max))


@SCAN_METRICS.scalar("max_sq_norm_ratio", "largest grad_sq_norm over the smallest nonzero one (the paper's ratio)")
def _max_sq_norm_ratio(doc, _):
    value = _max_norm_ratio(doc, None)
    return None if value is None else value**2


@SCAN_METRICS.scalar("min_cosine", "most negative cosine between two task gradients")
def _min_cosine(doc, _):
    return _extreme(_off_diagonal(doc["cosine"]), min)


@SCAN_METRICS.scalar("min_cosine_unbiased", "most negative bias-corrected cosine")
def _min_cosine_unbiased(doc, _):
    return _extreme(_off_diagonal(doc["cosine_unbiased"]), min)


for _name, _key, _pick, _text in (
    ("max_share", "share", max, "largest share of the mixed update"),
    ("min_share", "share", min, "smallest share of the mixed update"),
    ("max_degenerate_fraction", "degenerate_fraction", max, "largest fraction of all-equal-reward groups in a task"),
):
    SCAN_METRICS.scalar(_name, _text)(_over_tasks(_key, _pick))


@SCAN_METRICS.scalar("mixed_grad_norm", "norm of the mixed gradient")
def _mixed_norm(doc, _):
    return doc["mixed"]["grad_norm"]


@SCAN_METRICS.scalar("n_tasks", "number of tasks")
def _n_tasks(doc, _):
    return len(doc["tasks"])


@SCAN_METRICS.scalar("kruskal_p", "p-value of Kruskal-Wallis on per-prompt norms by task (stats)")
def _kruskal_p(doc, _):
    return ((doc.get("stats") or {}).get("kruskal") or {}).get("p")


@SCAN_METRICS.scalar("partial_r2_task", "partial R^2 of task in the OLS of log prompt norm (stats)")
def _partial_r2(doc, _):
    return ((doc.get("stats") or {}).get("ols") or {}).get("partial_r2_task")


def _task_key(key: str) -> Getter:
    return lambda doc, task: doc["tasks"][task].get(key)


for _key, _text in (
    ("share", "the task's share of the mixed update"),
    ("norm_ratio", "grad_norm over the smallest task's"),
    ("grad_norm", "||g_t||"),
    ("grad_sq_norm", "||g_t||^2"),
    ("grad_sq_norm_unbiased", "U-statistic estimate of ||E u||^2"),
    ("noise_scale", "gradient noise scale B_t"),
    ("mean_reward", "mean reward"),
    ("reward_std", "mean within-group reward std"),
    ("degenerate_fraction", "fraction of groups with all rewards equal"),
    ("mean_abs_advantage", "mean |A|"),
    ("mean_completion_length", "mean completion tokens"),
    ("pos_neg_ratio", "||g_t+|| / ||g_t-||"),
    ("pos_neg_cosine", "cos(g_t+, g_t-)"),
    ("mix_weight", "the task's weight w_t in the mixed loss"),
):
    SCAN_METRICS.per_task(_key, _text)(_task_key(_key))


@SCAN_METRICS.per_task("min_cosine", "most negative cosine of this task with another")
def _min_cosine_of(doc, task):
    return _extreme(_off_diagonal(doc["cosine"], task), min)


# --- comparison metrics (compare) --------------------------------------------------------------

COMPARE_METRICS = MetricRegistry("a comparison")


for _name, _key, _pick, _text in (
    ("min_drift_cosine", "drift_cosine", min, "smallest cos(g_t under A, g_t under B) over tasks"),
    ("min_gain", "gain", min, "smallest learning gain over tasks"),
    ("max_gain", "gain", max, "largest learning gain over tasks"),
    ("max_norm_ratio_change", "norm_ratio_change", max, "largest change of a task's norm_ratio (B - A)"),
):
    COMPARE_METRICS.scalar(_name, _text)(_over_tasks(_key, _pick))


def _relation(against: str) -> Getter:
    def get(doc, _):
        for row in doc.get("relation", []):
            if row["against"] == against and row["gain"] == doc.get("gain_source"):
                return row["rho"]
        return None
    return get


COMPARE_METRICS.scalar("spearman_gain_sq_norm", "Spearman rho across tasks of A's grad_sq_norm and the gain")(
    _relation("grad_sq_norm"))
COMPARE_METRICS.scalar("spearman_gain_share", "Spearman rho across tasks of A's share and the gain")(
    _relation("share"))

for _key, _text in (
    ("gain", "learning gain: mean reward under B minus under A (or from --log)"),
    ("drift_cosine", "cos(g_t under A, g_t under B)"),
    ("gain_per_sq_norm", "gain / ||g_t||^2 under A"),
    ("grad_norm_change", "grad_norm under B minus under A"),
    ("norm_ratio_change", "norm_ratio under B minus under A"),
    ("share_change", "share under B minus under A"),
    ("mean_reward_a", "mean reward under A"),
    ("mean_reward_b", "mean reward under B"),
    ("grad_sq_norm_a", "||g_t||^2 under A"),
    ("log_gain", "windowed gain from the training log"),
):
    COMPARE_METRICS.per_task(_key, _text)(_task_key(_key))
