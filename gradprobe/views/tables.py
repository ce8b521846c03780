"""Tables of scans, comparisons, gains and checks as plain grids (title, header, rows of strings).

Built once and rendered by every view: rich tables on the console, markdown, HTML. The numbers
are defined in docs/metrics.md.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradprobe.views.console import GRADIENT_COLUMNS, ROLLOUT_COLUMNS, _unbiased_cell, fmt
from gradprobe.views.stats_view import Grid, stats_grids


def _task_grid(document: dict[str, Any], title: str, columns: list[tuple[str, str | None, str]]) -> Grid:
    rows = [[name] + [_unbiased_cell(task) if key is None else fmt(task.get(key), spec)
                      for _, key, spec in columns]
            for name, task in document["tasks"].items()]
    return title, ["task"] + [header for header, _, _ in columns], rows


def _cosine_grid(cosine: dict[str, Any], title: str) -> Grid | None:
    tasks = cosine["tasks"]
    if len(tasks) < 2 or all(v is None for i, row in enumerate(cosine["matrix"])
                             for j, v in enumerate(row) if i != j):
        return None
    rows = [[task] + [fmt(v, "+.3f") for v in row] for task, row in zip(tasks, cosine["matrix"])]
    return title, [""] + tasks, rows


def _sign_grid(document: dict[str, Any]) -> Grid:
    rows = [[name, fmt(t.get("pos_grad_norm"), ".4g"), fmt(t.get("neg_grad_norm"), ".4g"),
             fmt(t.get("pos_neg_ratio"), ".2f"), fmt(t.get("pos_neg_cosine"), "+.3f"),
             fmt(t.get("noise_scale"), ".3g")] for name, t in document["tasks"].items()]
    return ("Sign decomposition (A>0 vs A<0) and noise",
            ["task", "pos_grad_norm", "neg_grad_norm", "pos/neg", "cos(pos,neg)", "noise_scale"], rows)


def scan_grids(document: dict[str, Any], with_stats: bool = True) -> list[Grid]:
    """The console report's tables: rollouts, gradients, cosines, signs (and the stats tables)."""
    grids: list[Grid] = [
        _task_grid(document, "Rollouts per task", ROLLOUT_COLUMNS),
        _task_grid(document, "Per-task gradients", GRADIENT_COLUMNS),
    ]
    for key, title in (("cosine", "Task-gradient cosines"),
                       ("cosine_unbiased", "Bias-corrected cosines g_s.g_t / sqrt(U_s U_t)")):
        grid = _cosine_grid(document[key], title)
        if grid is not None:
            grids.append(grid)
    grids.append(_sign_grid(document))
    if with_stats and document.get("stats"):
        grids.extend(g for g in stats_grids(document["stats"]) if g[2])
    return grids


def scan_header(document: dict[str, Any]) -> list[str]:
    """Lines naming the model, parameters, advantage and loss of a scan."""
    model = document["model"]
    return [
        f"model {model['path']} ({model['n_selected_parameters']:,} of {model['n_parameters']:,} "
        f"parameters, {model.get('dtype', '?')} on {model.get('device', '?')})",
        f"advantage {document['advantage']['name']}: {document['advantage']['formula']}; "
        f"loss {document['loss']['name']}: {document['loss']['formula']}",
    ]


def checks_grid(checks: list[dict[str, Any]]) -> Grid:
    """One row per evaluated --fail-on condition."""
    rows = [[c["expression"], c["metric"] + (f"[{c['index']}]" if c["index"] is not None else ""),
             fmt(c["value"], ".4g"), "FIRED" if c["fired"] else "ok"] for c in checks]
    return "--fail-on checks", ["expression", "metric", "value", "result"], rows


def compare_grids(document: dict[str, Any]) -> list[Grid]:
    """Gains and gradient changes per task, the drift, and the gain-gradient relation."""
    tasks = document["tasks"]
    has_b = document["b"] is not None
    has_log = document["log"] is not None
    header = ["task"]
    if has_b:
        header += ["reward A", "reward B", "gain"]
    if has_log:
        header += ["log gain"]
    header += ["grad_sq_norm A", "gain / grad_sq_norm"]
    rows = []
    for name, t in tasks.items():
        row = [name]
        if has_b:
            row += [fmt(t["mean_reward_a"], ".3f"), fmt(t["mean_reward_b"], ".3f"), fmt(t["gain"], "+.3f")]
        if has_log:
            row += [fmt(t["log_gain"], "+.3f")]
        row += [fmt(t["grad_sq_norm_a"], ".4g"), fmt(t["gain_per_sq_norm"], "+.3g")]
        rows.append(row)
    grids: list[Grid] = [("Learning gains per task", header, rows)]
    if has_b:
        drift = document["drift"]
        drift_title = "Change from A to B, and drift cos(g_t under A, g_t under B)"
        if drift.get("kind") == "projected":
            drift_title += f" (projected, dim {drift['dim']}, +-{drift['error_bound_95']:.3f} at 95%)"
        elif drift.get("kind") == "exact":
            drift_title += " (exact)"
        projected = drift.get("kind") == "projected"
        grids.append((drift_title,
                      ["task", "grad_norm A -> B", "norm_ratio A -> B", "share A -> B", "drift cosine"]
                      + (["95% CI"] if projected else []),
                      [[name, f"{fmt(t['grad_norm_a'], '.4g')} -> {fmt(t['grad_norm_b'], '.4g')}",
                        f"{fmt(t['norm_ratio_a'], '.2f')} -> {fmt(t['norm_ratio_b'], '.2f')}",
                        f"{fmt(t['share_a'], '.1%')} -> {fmt(t['share_b'], '.1%')}",
                        fmt(t.get("drift_cosine"), "+.3f")] + ([_ci_cell(t)] if projected else [])
                       for name, t in tasks.items()]))
    if document["relation"]:
        grids.append(("Spearman across tasks: gradient size under A against the gain",
                      ["gain from", "against", "rho", "p", "p method", "tasks"],
                      [[r["gain"], r["against"], fmt(r["rho"], "+.2f"), fmt(r["p"], ".3g"),
                        r["p_method"] or "-", str(r["n"])] for r in document["relation"]]))
    return grids


def _ci_cell(task: dict[str, Any]) -> str:
    ci = task.get("drift_cosine_ci")
    return f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "-"


def gains_grid(document: dict[str, Any]) -> Grid:
    """Per task: the windowed gain at the document's step, and its windows."""
    rows = [[name, fmt(t["gain"], "+.4f"), fmt(t["before_mean"], ".4f"), fmt(t["after_mean"], ".4f"),
             str(t["n_before_steps"]), str(t["n_after_steps"]), str(t["n_rows"])]
            for name, t in document["tasks"].items()]
    return (f"Windowed learning gain at step {document['step']} (window {document['window']})",
            ["task", "gain", "mean before", "mean after", "steps before", "steps after", "rows"], rows)


def grid_table(grid: Grid) -> Table:
    """A grid as a rich table (first column left, the rest right-aligned)."""
    title, header, rows = grid
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))  # plain text: "share[code]" is no markup
    return table


def render_checks(checks: list[dict[str, Any]]) -> RenderableType:
    """The checks table and one red line per fired alert."""
    fired = [c for c in checks if c["fired"]]
    lines = [Text(f"ALERT {c['message']}", style="bold red") for c in fired]  # Text: no markup
    summary = (Text(f"{len(fired)} of {len(checks)} --fail-on checks fired", style="bold red") if fired
               else Text(f"all {len(checks)} --fail-on checks passed", style="bold green"))
    return Group(grid_table(checks_grid(checks)), *lines, summary)


def render_compare(document: dict[str, Any]) -> RenderableType:
    """Everything the console shows for a comparison."""
    parts: list[RenderableType] = [Text(_compare_heading(document), style="bold")]
    parts += [grid_table(g) for g in compare_grids(document)]
    drift = document["drift"]
    if drift.get("error_note"):
        parts.append(Text(f"Drift: {drift['error_note']}."))
    parts += [Text(note, style="yellow") for note in document["notes"]]
    return Group(*parts)


def _compare_heading(document: dict[str, Any]) -> str:
    text = f"gradprobe compare  A {document['a']['path']}"
    if document["b"] is not None:
        text += f"  B {document['b']['path']}"
    if document["log"] is not None:
        log = document["log"]
        text += f"  log {log['source']} (window {log['window']}, step {log['step']})"
    return text


def render_gains(document: dict[str, Any]) -> RenderableType:
    """The gains table and its formula."""
    return Group(grid_table(gains_grid(document)), Text(document["formula"], style="dim"))
