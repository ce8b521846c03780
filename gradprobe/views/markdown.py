"""GitHub markdown of a scan or a comparison, for a pull-request comment."""

from __future__ import annotations

from typing import Any

from gradprobe.views.stats_view import Grid
from gradprobe.views.tables import checks_grid, compare_grids, gains_grid, scan_grids, scan_header


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def grid_markdown(grid: Grid, level: int = 3) -> str:
    """One grid as a heading and a markdown table."""
    title, header, rows = grid
    lines = [f"{'#' * level} {_cell(title)}", "", "| " + " | ".join(map(_cell, header)) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _checks_markdown(checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return []
    fired = [c for c in checks if c["fired"]]
    out = ["## Checks", ""]
    out += [f"- :x: **{_cell(c['message'])}**" for c in fired]
    out += [f"- {len(fired)} of {len(checks)} `--fail-on` checks fired" if fired
            else f"- all {len(checks)} `--fail-on` checks passed", ""]
    out.append(grid_markdown(checks_grid(checks)))
    return out


def scan_markdown(document: dict[str, Any], checks: list[dict[str, Any]] | None = None) -> str:
    """A scan's verdict, tables and statistics (and --fail-on checks) as markdown."""
    out = ["## gradprobe scan", "", f"**{_cell(document['verdict'])}**", ""]
    out += [f"- {_cell(line)}" for line in scan_header(document)] + [""]
    out += _checks_markdown(checks or [])
    for grid in scan_grids(document, with_stats=False):
        out.append(grid_markdown(grid))
    if document.get("stats"):
        from gradprobe.views.stats_view import stats_markdown

        out.append(stats_markdown(document["stats"]))
    return "\n".join(out).rstrip() + "\n"


def compare_markdown(document: dict[str, Any], checks: list[dict[str, Any]] | None = None) -> str:
    """A comparison's tables, drift note and caveats as markdown."""
    out = ["## gradprobe compare", "", f"- A: `{_cell(document['a']['path'])}`"]
    if document["b"] is not None:
        out.append(f"- B: `{_cell(document['b']['path'])}`")
    if document["log"] is not None:
        log = document["log"]
        out.append(f"- log: `{_cell(log['source'])}` (window {log['window']}, step {log['step']})")
    if document["gain_formula"]:
        out.append(f"- gain: {_cell(document['gain_formula'])}")
    if document["drift"].get("error_note"):
        out.append(f"- drift: {_cell(document['drift']['error_note'])}")
    out += [f"- note: {_cell(n)}" for n in document["notes"]] + [""]
    out += _checks_markdown(checks or [])
    out += [grid_markdown(g) for g in compare_grids(document)]
    return "\n".join(out).rstrip() + "\n"


def gains_markdown(document: dict[str, Any]) -> str:
    """The windowed gains table as markdown."""
    return grid_markdown(gains_grid(document), level=2) + f"\n{document['formula']}\n"
