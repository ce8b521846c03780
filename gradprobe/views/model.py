"""The report model: what a scan, comparison or gains document says, built once for every view.

A `Report` is plain strings: a headline (the verdict), the findings of the statistics, the
caveats, a few lines of context, and sections (tables with a legend). The console, markdown and
HTML views only lay it out, so they cannot disagree, and each number appears once: a task's norm
ratio is shown with the one interval the statistics computed for it. The numbers are defined in
docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gradprobe.views.mix_view import mix_lines


@dataclass(frozen=True)
class Section:
    """A table: a title, a header, rows of cell strings, and legend lines under it."""

    title: str
    header: list[str]
    rows: list[list[str]]
    legend: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """Everything a view shows, in reading order."""

    title: str
    headline: str | None
    findings: list[str]
    caveats: list[str]
    context: list[str]
    sections: list[Section]


def fmt(value: Any, spec: str = ".3g") -> str:
    """A number for a table cell; '-' for an undefined (None) value."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def interval(lo: float | None, hi: float | None, spec: str = ".3g") -> str:
    """'[lo, hi]' ('-' for an undefined end), or '-' when both are undefined."""
    return "-" if lo is None and hi is None else f"[{fmt(lo, spec)}, {fmt(hi, spec)}]"


# ------------------------------------------------------------------------------------- scan


def scan_report(document: dict[str, Any]) -> Report:
    """The report of a scan: verdict, findings, caveats, then rollouts, gradients, cosines,
    signs and the statistics' tables."""
    from gradprobe.views.stats_view import stats_findings, stats_sections

    stats = document.get("stats") or {}
    sections = [_rollout_section(document), _gradient_section(document)]
    for key, title in (("cosine", "Task-gradient cosines"),
                       ("cosine_unbiased", "Bias-corrected cosines g_s.g_t / sqrt(U_s U_t)")):
        section = _cosine_section(document[key], title)
        if section is not None:
            sections.append(section)
    sections.append(_sign_section(document))
    if stats:
        sections += stats_sections(stats)
    headline = document.get("verdict")
    findings = [f for f in stats_findings(stats) if not headline or not headline.startswith(f.rstrip("."))]
    return Report("gradprobe scan", headline, findings,
                  [c["message"] for c in document.get("caveats", [])], _scan_context(document),
                  sections)


def _scan_context(document: dict[str, Any]) -> list[str]:
    model, config = document["model"], document.get("config", {})
    lines = [
        f"model {model['path']} ({model['n_selected_parameters']:,} of {model['n_parameters']:,} "
        f"parameters, {model.get('dtype', '?')} on {model.get('device', '?')})",
        f"advantage {document['advantage']['name']}: {document['advantage']['formula']}; "
        f"loss {document['loss']['name']}: {document['loss']['formula']}",
        *mix_lines(document.get("mix")),
    ]
    if config.get("group_size") and not document.get("rollouts_source"):
        lines.append(f"K={config['group_size']} completions per prompt, temperature "
                     f"{config.get('temperature')}, top-p {config.get('top_p')}, "
                     f"at most {config.get('max_new_tokens')} new tokens, seed {config.get('seed')}")
    fidelity = document.get("proxy_fidelity")
    if fidelity:
        lines.append(f"Proxy fidelity of --params {' '.join(fidelity['params'])} against all "
                     f"parameters: Spearman {fmt(fidelity['spearman'], '.2f')} across "
                     f"{fidelity['n_tasks']} tasks, max norm-ratio error "
                     f"{fmt(fidelity['max_ratio_error'], '.1%')}")
    return lines


def _rollout_section(document: dict[str, Any]) -> Section:
    rewards = document.get("rewards") or {}
    rows = []
    for name, t in document["tasks"].items():
        mixed = None if t.get("degenerate_fraction") is None else 1 - t["degenerate_fraction"]
        rows.append([name, fmt((rewards.get(name) or {}).get("spec")), fmt(t["n_prompts"]),
                     fmt(t["mean_reward"], ".3f"), fmt(t["reward_std"], ".3f"), fmt(mixed, ".0%"),
                     fmt(t["mean_abs_advantage"], ".3f"), fmt(t["mean_completion_length"], ".1f")])
    return Section("Rollouts and rewards per task",
                   ["task", "reward", "prompts", "mean reward", "reward std", "mixed", "mean |A|",
                    "mean length"], rows,
                   ["reward: the task's effective reward (mix spec and --reward); mixed: share of "
                    "prompt groups whose rewards are not all equal (the others carry no signal); "
                    "length in tokens"])


def _gradient_section(document: dict[str, Any]) -> Section:
    ratio_ci = (document.get("stats") or {}).get("ratio_ci") or {}
    ci_rows = ratio_ci.get("tasks") or {}
    rows = []
    for name, t in document["tasks"].items():
        ratio = fmt(t.get("norm_ratio"), ".2f")
        ci = ci_rows.get(name)
        if ci and name != ratio_ci.get("reference") and interval(ci.get("lo"), ci.get("hi")) != "-":
            ratio += " " + interval(ci.get("lo"), ci.get("hi"), ".2f")
        rows.append([name, fmt(t.get("grad_norm"), ".4g"), fmt(t.get("grad_sq_norm"), ".4g"),
                     _unbiased_cell(t), ratio, fmt(t.get("share"), ".1%")])
    legend = ["norm: grad_norm ||g_t||; sq norm: grad_sq_norm; U: the unbiased squared norm "
              "(U-statistic over prompts) [jackknife 95% interval]; U <= 0: below this sample's noise"]
    if ci_rows:
        level = f"{100 * ratio_ci.get('level', 0.95):g}%"
        legend.append(f"ratio: norm over the smallest task's ({ratio_ci.get('reference')}) "
                      f"[{level} percentile bootstrap interval, prompts resampled within each task, "
                      f"n={ratio_ci.get('n_bootstrap')}, seed {ratio_ci.get('seed')}]")
        legend += [f"{name}: no interval ({row['reason']})" for name, row in ci_rows.items()
                   if row.get("reason")]
        legend += _max_over_min_line(ratio_ci)
    else:
        legend.append("ratio: norm over the smallest task's")
    legend.append("share: the task's part of the mixed update w_t g_t.g / ||g||^2")
    return Section("Per-task gradients", ["task", "norm", "sq norm", "U [95% CI]", "ratio", "share"],
                   rows, legend)


def _max_over_min_line(ratio_ci: dict[str, Any]) -> list[str]:
    """The largest-over-smallest ratio, unless it is a task's ratio to the reference, which the
    table already shows with that task's own interval."""
    mom = ratio_ci.get("max_over_min") or {}
    if not mom.get("max_task") or mom.get("min_task") == ratio_ci.get("reference"):
        return []
    return [f"largest over smallest ({mom['max_task']}/{mom['min_task']}): {fmt(mom.get('ratio'), '.2f')}"
            f" {interval(mom.get('lo'), mom.get('hi'), '.2f')}"]


def _unbiased_cell(task: dict[str, Any]) -> str:
    value = task.get("grad_sq_norm_unbiased")
    lo, hi = task.get("grad_sq_norm_unbiased_ci") or (None, None)
    if value is None:
        return "-"
    cell = f"{value:.3g}"
    return cell if interval(lo, hi) == "-" else f"{cell} {interval(lo, hi)}"


def task_labels(tasks: list[str], budget: int = 40) -> tuple[list[str], list[str]]:
    """Column labels for a tasks x tasks matrix: the names, or numbers with a legend line when
    the names would not fit an 80-column terminal."""
    if sum(len(t) + 3 for t in tasks) <= budget:
        return list(tasks), []
    numbers = [str(i + 1) for i in range(len(tasks))]
    return numbers, ["columns: " + ", ".join(f"{n} {t}" for n, t in zip(numbers, tasks))]


def _cosine_section(cosine: dict[str, Any], title: str) -> Section | None:
    tasks = cosine["tasks"]
    if len(tasks) < 2 or all(v is None for i, row in enumerate(cosine["matrix"])
                             for j, v in enumerate(row) if i != j):
        return None
    labels, legend = task_labels(tasks)
    rows = [[task] + [fmt(v, "+.3f") for v in row] for task, row in zip(tasks, cosine["matrix"])]
    return Section(title, [""] + labels, rows, legend + ["negative: the two tasks' gradients conflict"])


def _sign_section(document: dict[str, Any]) -> Section:
    rows = [[name, fmt(t.get("pos_grad_norm"), ".4g"), fmt(t.get("neg_grad_norm"), ".4g"),
             fmt(t.get("pos_neg_ratio"), ".2f"), fmt(t.get("pos_neg_cosine"), "+.3f"),
             fmt(t.get("noise_scale"), ".3g")] for name, t in document["tasks"].items()]
    return Section("Sign decomposition (A>0 vs A<0) and noise",
                   ["task", "|g+|", "|g-|", "|g+|/|g-|", "cos(g+,g-)", "noise scale"], rows,
                   ["|g+|, |g-|: pos_grad_norm, neg_grad_norm, the norms of the parts from completions "
                    "with positive and negative advantage; noise scale: tr(Sigma_u)/U, about the "
                    "prompts a task needs before its direction is trustworthy"])


# ---------------------------------------------------------------------------------- compare


def compare_report(document: dict[str, Any]) -> Report:
    """The report of a comparison: gains, changes and drift, the relation; warnings as caveats."""
    context = [f"A: {document['a']['path']}"]
    if document["b"] is not None:
        context.append(f"B: {document['b']['path']}")
    if document["log"] is not None:
        log = document["log"]
        context.append(f"log: {log['source']} (window {log['window']}, step {log['step']})")
    if document.get("gain_formula"):
        context.append(f"gain: {document['gain_formula']}")
    if document["drift"].get("error_note"):
        context.append(f"drift: {document['drift']['error_note']}")
    caveats = [w["message"] for w in document.get("warnings", [])] + list(document["notes"])
    return Report("gradprobe compare", None, [], caveats, context, _compare_sections(document))


def _compare_sections(document: dict[str, Any]) -> list[Section]:
    tasks = document["tasks"]
    has_b, has_log = document["b"] is not None, document["log"] is not None
    header = ["task"] + (["reward A", "reward B", "gain"] if has_b else []) + (
        ["log gain"] if has_log else []) + ["sq norm A", "gain / sq norm"]
    rows = []
    for name, t in tasks.items():
        row = [name]
        if has_b:
            row += [fmt(t["mean_reward_a"], ".3f"), fmt(t["mean_reward_b"], ".3f"), fmt(t["gain"], "+.3f")]
        if has_log:
            row += [fmt(t["log_gain"], "+.3f")]
        rows.append(row + [fmt(t["grad_sq_norm_a"], ".4g"), fmt(t["gain_per_sq_norm"], "+.3g")])
    sections = [Section("Learning gains per task", header, rows,
                        ["sq norm A: grad_sq_norm under A; gain / sq norm: the gain per unit squared "
                         "gradient"])]
    if has_b:
        sections.append(_drift_section(document))
    if document["relation"]:
        sections.append(Section(
            "Spearman across tasks: gradient size under A against the gain",
            ["gain from", "against", "rho", "p", "p method", "tasks"],
            [[r["gain"], r["against"], fmt(r["rho"], "+.2f"), fmt(r["p"], ".3g"),
              r["p_method"] or "-", str(r["n"])] for r in document["relation"]]))
    return sections


def _drift_section(document: dict[str, Any]) -> Section:
    drift = document["drift"]
    title = "Change from A to B, and drift cos(g_t under A, g_t under B)"
    projected = drift.get("kind") == "projected"
    if projected:
        title += (f" (projected: {drift.get('projection', 'gaussian')}, dim {drift['dim']}, "
                  f"+-{drift['error_bound_95']:.3f} at 95%)")
    elif drift.get("kind") == "exact":
        title += " (exact)"
    rows = [[name, f"{fmt(t['grad_norm_a'], '.4g')} -> {fmt(t['grad_norm_b'], '.4g')}",
             f"{fmt(t['norm_ratio_a'], '.2f')} -> {fmt(t['norm_ratio_b'], '.2f')}",
             f"{fmt(t['share_a'], '.1%')} -> {fmt(t['share_b'], '.1%')}",
             fmt(t.get("drift_cosine"), "+.3f")]
            + ([interval(*(t.get("drift_cosine_ci") or (None, None)), spec="+.3f")] if projected else [])
            for name, t in document["tasks"].items()]
    return Section(title, ["task", "grad_norm A -> B", "ratio A -> B", "share A -> B", "drift"]
                   + (["95% CI"] if projected else []), rows)


# ------------------------------------------------------------------------- gains and checks


def gains_report(document: dict[str, Any]) -> Report:
    """The windowed gains of a training log."""
    rows = [[name, fmt(t["gain"], "+.4f"), fmt(t["before_mean"], ".4f"), fmt(t["after_mean"], ".4f"),
             str(t["n_before_steps"]), str(t["n_after_steps"]), str(t["n_rows"])]
            for name, t in document["tasks"].items()]
    section = Section(f"Windowed learning gain at step {document['step']} (window {document['window']})",
                      ["task", "gain", "mean before", "mean after", "steps before", "steps after",
                       "rows"], rows, [document["formula"]])
    return Report("gradprobe gains", None, [], [], [], [section])


def checks_section(checks: list[dict[str, Any]]) -> Section:
    """One row per evaluated --fail-on condition."""
    rows = [[c["expression"], c["metric"] + (f"[{c['index']}]" if c["index"] is not None else ""),
             fmt(c["value"], ".4g"), "FIRED" if c["fired"] else "ok"] for c in checks]
    return Section("--fail-on checks", ["expression", "metric", "value", "result"], rows)
