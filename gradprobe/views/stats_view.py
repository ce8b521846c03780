"""The sections of the report model that show the `stats` dict of gradprobe.stats.compute_stats.

The numbers are defined in docs/metrics.md, "Statistics against reward and advantage". The norm
ratios and their intervals are not here: the per-task gradients section shows each ratio once,
with its interval.
"""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType

from gradprobe.stats import format_p
from gradprobe.views.model import Section, fmt, interval


def _p(p: float | None) -> str:
    return "-" if p is None else format_p(p)[1:].lstrip("=")


def _kruskal(stats: dict) -> Section:
    kw = stats["kruskal"]
    row = [fmt(kw["H"], ".2f"), fmt(kw["df"]), _p(kw["p"]), fmt(kw["epsilon_squared"], ".3f"),
           fmt(kw["n"]), kw["reason"] or ""]
    return Section("Imbalance across tasks: Kruskal-Wallis on per-prompt norms",
                   ["H", "df", "p", "epsilon^2", "n", "note"], [row])


def _pairwise(stats: dict) -> Section:
    rows = [[r["a"], r["b"], fmt(r["U"], ".1f"), _p(r["p"]), _p(r["p_holm"]),
             fmt(r["effect"], "+.3f"), r["reason"] or ""] for r in stats["pairwise"]]
    return Section("Pairwise Mann-Whitney on per-prompt norms",
                   ["a", "b", "U", "p", "p_holm", "effect", "note"], rows,
                   ["p_holm: Holm-adjusted over all pairs; effect: rank-biserial correlation, "
                    "+ means a's norms tend to be larger"])


def _spearman(stats: dict) -> Section:
    sp, labels = stats["spearman"], stats["covariate_labels"]
    rows = []
    for scope, results in [("pooled", sp["pooled"])] + list(sp["within"].items()):
        n = next(iter(results.values()))["n"] if results else None
        for i, (key, label) in enumerate(labels.items()):
            r = results[key]
            rho = fmt(r["rho"], "+.2f") if r["rho"] is not None else f"- ({r['reason']})"
            rows.append([f"{scope} (n={n})" if i == 0 else "", label, rho,
                         interval(r["lo"], r["hi"], "+.2f"), _p(r["p"])])
    return Section("Spearman rho of the per-prompt norm ||u_p|| with each covariate",
                   ["prompts", "covariate", "rho", "95% CI", "p"], rows, [f"CI: {sp['method']}"])


def _ols(stats: dict) -> Section:
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
        rows.append([f"beta {c}", f"{r['beta']:+.3g} (t={fmt(r['t'], '.2f')}, p={_p(r['p'])})"])
    return Section("Explained or inherent: OLS of log ||u_p||", ["quantity", "value"], rows)


def _bins(stats: dict) -> Section:
    by_task = stats["reward_bins"]["by_task"]
    first = next(iter(by_task.values()), [])
    header = ["task"] + [f"{b['lo']:.1f}-{b['hi']:.1f}" for b in first]
    rows = [[t] + [f"{fmt(b['mean_norm'], '.3g')} ({b['n']}/{b['n_degenerate']})" for b in bins]
            for t, bins in by_task.items()]
    return Section("Mean ||u_p|| by mean-reward bin", header, rows,
                   ["cell: mean ||u_p|| (usable prompts / degenerate prompts, excluded)"])


def _dominance(stats: dict) -> list[Section]:
    """The dominance test, when the statistics hold one: its pairwise ratios with their
    intervals, or else its plain (scalar or list) entries."""
    dominance = stats.get("dominance")
    if not isinstance(dominance, dict):
        return []
    pairs = dominance.get("pairs")
    if isinstance(pairs, list) and all(isinstance(r, dict) and {"a", "b", "ratio"} <= set(r) for r in pairs):
        return [_dominance_pairs(dominance)] if pairs else []
    rows = [[key.replace("_", " "), ", ".join(map(fmt, value)) if isinstance(value, list) else fmt(value)]
            for key, value in dominance.items() if not isinstance(value, dict)
            and not (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value))]
    return [Section("Dominance", ["quantity", "value"], rows)] if rows else []


def _dominance_pairs(dominance: dict) -> Section:
    rows = [[r["a"], r["b"], fmt(r["ratio"], ".2f"), interval(r.get("lo"), r.get("hi"), ".2f"),
             _p(r.get("p_holm")), r.get("reason") or ""] for r in dominance["pairs"]]
    level = dominance.get("level")
    legend = [f"ratio: a's norm over b's{', ' + dominance['method'] if dominance.get('method') else ''}"
              + (f"; interval at {100 * level:g}%" if level else "") + "; p_holm: Holm-adjusted"]
    if dominance.get("leading"):
        legend.append(f"leading: {', '.join(dominance['leading'])}; dominant: "
                      f"{dominance.get('dominant') or 'none'}")
    return Section("Which task's gradient is largest: pairwise ratios", ["a", "b", "ratio", "interval",
                                                                          "p_holm", "note"], rows, legend)


SECTIONS = (_kruskal, _pairwise, _spearman, _ols, _bins)


def stats_sections(stats: dict[str, Any]) -> list[Section]:
    """The statistics' tables (those with rows), in reading order."""
    sections = _dominance(stats) + [build(stats) for build in SECTIONS]
    return [s for s in sections if s.rows]


def stats_findings(stats: dict[str, Any]) -> list[str]:
    """The statistics' verdict sentences (each built only from numbers in `stats`)."""
    return list(stats.get("verdicts", []))


def render_stats(stats: dict[str, Any]) -> list[RenderableType]:
    """The statistics' sections and findings as rich renderables."""
    from gradprobe.views.console import findings_text, section_table

    return [section_table(s) for s in stats_sections(stats)] + [findings_text(stats_findings(stats))]


def stats_markdown(stats: dict[str, Any]) -> str:
    """The statistics' findings and sections as GitHub markdown."""
    from gradprobe.views.markdown import section_markdown

    out = ["## Statistics", ""] + [f"- {v}" for v in stats_findings(stats)] + [""]
    out += [section_markdown(s) for s in stats_sections(stats)]
    return "\n".join(out)
