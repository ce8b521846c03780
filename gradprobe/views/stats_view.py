"""Views of the `stats` dict that gradprobe.stats.compute_stats makes: rich tables and markdown.

Both views show the same tables, built once as (title, header, rows) of strings; the numbers are
defined in ../shared/design/metrics.md, "Statistics against reward and advantage".
"""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from gradprobe.stats import format_p
from gradprobe.views.console import fmt

Grid = tuple[str, list[str], list[list[str]]]


def _p(p: float | None) -> str:
    return "-" if p is None else format_p(p)[1:].lstrip("=")


def _ci(lo: float | None, hi: float | None, spec: str) -> str:
    return "-" if lo is None or hi is None else f"{lo:{spec}} to {hi:{spec}}"


def _kruskal(stats: dict) -> Grid:
    kw = stats["kruskal"]
    row = [fmt(kw["H"], ".2f"), fmt(kw["df"]), _p(kw["p"]), fmt(kw["epsilon_squared"], ".3f"),
           fmt(kw["n"]), kw["reason"] or ""]
    return ("Imbalance across tasks: Kruskal-Wallis on per-prompt norms",
            ["H", "df", "p", "epsilon^2", "n", "note"], [row])


def _pairwise(stats: dict) -> Grid:
    rows = [[r["a"], r["b"], fmt(r["U"], ".1f"), _p(r["p"]), _p(r["p_holm"]),
             fmt(r["effect"], "+.3f"), r["reason"] or ""] for r in stats["pairwise"]]
    return ("Pairwise Mann-Whitney (Holm-adjusted; effect = rank-biserial, + means a > b)",
            ["a", "b", "U", "p", "p_holm", "effect", "note"], rows)


def _dominance(stats: dict) -> Grid:
    dom = stats["dominance"]
    level = f"{100 * dom['level']:g}% CI"
    unbounded = float("inf")
    rows = [[r["a"], r["b"], fmt(r["ratio"], ".2f"),
             _ci(r["lo"], unbounded if r["hi"] is None else r["hi"], ".2f"),
             fmt(r["plain_ratio"], ".2f"), _p(r["p"]), _p(r["p_holm"]), r["reason"] or ""]
            for r in dom["pairs"]]
    title = (f"Norm ratios sqrt(U_a/U_b) (Fieller interval, jackknife, Holm); leading: "
             f"{', '.join(dom['leading']) or '-'}; dominant: {dom['dominant'] or 'none'}")
    return title, ["a", "b", "ratio", level, "plain ratio", "p", "p_holm", "note"], rows


def _spearman(stats: dict) -> Grid:
    sp, labels = stats["spearman"], stats["covariate_labels"]
    scopes = [("pooled", sp["pooled"])] + list(sp["within"].items())

    def cell(r: dict) -> str:
        if r["rho"] is None:
            return f"- ({r['reason']})"
        return f"{r['rho']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}] {_p(r['p'])}"

    rows = [[scope, fmt(next(iter(res.values()))["n"])] + [cell(res[c]) for c in labels]
            for scope, res in scopes]
    return (f"Spearman rho of ||u_p|| [CI] p; CI: {sp['method']}",
            ["scope", "n", *labels.values()], rows)


def _ols(stats: dict) -> Grid:
    o = stats["ols"]
    rows = [["R^2 covariates", fmt(o["r2_covariates"], ".3f")],
            ["R^2 task only", fmt(o["r2_task_only"], ".3f")],
            ["R^2 covariates + task", fmt(o["r2_with_task"], ".3f")],
            ["partial R^2 of task", fmt(o["partial_r2_task"], ".3f")],
            ["F (task)", fmt(o["F"], ".2f")],
            ["df", f"{fmt(o['df_num'])}, {fmt(o['df_den'])}"],
            ["p (task)", _p(o["p"])], ["n", fmt(o["n"])],
            ["covariates", ", ".join(o["covariates"]) or "-"]]
    for key in ("dropped_constant", "dropped_collinear", "reason", "task_reason"):
        if o[key]:
            rows.append([key.replace("_", " "), ", ".join(o[key]) if isinstance(o[key], list)
                         else o[key]])
    for c, r in o["coefficients"].items():
        rows.append([f"beta {c}", f"{r['beta']:+.3g} (t={fmt(r['t'], '.2f')}, {_p(r['p'])})"])
    return "Explained or inherent: OLS of log ||u_p||", ["quantity", "value"], rows


def _bins(stats: dict) -> Grid:
    rb = stats["reward_bins"]
    by_task = rb["by_task"]
    first = next(iter(by_task.values()), [])
    header = ["task"] + [f"[{b['lo']:.2f}, {b['hi']:.2f}]" for b in first]
    rows = [[t] + [f"{fmt(b['mean_norm'], '.3g')} (n={b['n']}, deg={b['n_degenerate']})"
                   for b in bins] for t, bins in by_task.items()]
    return "Mean ||u_p|| by mean-reward bin", header, rows


GRIDS = (_kruskal, _pairwise, _dominance, _spearman, _ols, _bins)


def _grids(stats: dict) -> list[Grid]:
    return [g(stats) for g in GRIDS]


def stats_grids(stats: dict[str, Any]) -> list[Grid]:
    """The stats tables as (title, header, rows) grids, for the markdown and HTML views."""
    return _grids(stats)


def render_stats(stats: dict[str, Any]) -> list[RenderableType]:
    """The stats tables (Kruskal-Wallis, pairwise, norm ratios, Spearman, OLS, reward bins) and
    the verdict sentences, as rich renderables (metrics.md)."""
    parts: list[RenderableType] = []
    for title, header, rows in _grids(stats):
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(header):
            table.add_column(Text(h), justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*(Text(str(cell)) for cell in row))  # task names are not markup
        parts.append(table)
    parts.append(Text("\n".join(f"- {v}" for v in stats["verdicts"]), style="bold"))
    return parts


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def stats_markdown(stats: dict[str, Any]) -> str:
    """The same tables and verdicts as `render_stats`, as GitHub markdown (metrics.md)."""
    out = ["## Statistics", ""]
    out += [f"- {v}" for v in stats["verdicts"]] + [""]
    for title, header, rows in _grids(stats):
        if not rows:
            continue
        out += [f"### {_md_cell(title)}", "", "| " + " | ".join(map(_md_cell, header)) + " |",
                "|" + "---|" * len(header)]
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)
