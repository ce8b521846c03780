"""One self-contained HTML page: the tables of a scan or comparison and its PNGs, base64-embedded."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from gradprobe.views.stats_view import Grid
from gradprobe.views.tables import checks_grid, compare_grids, scan_grids, scan_header

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 72em;
       color: #1b1f23; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f8fa; }
.verdict { font-weight: bold; font-size: 1.1em; }
.alert { color: #b31d28; font-weight: bold; }
.note { color: #7a5b00; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
"""


def grid_html(grid: Grid) -> str:
    """One grid as a heading and an HTML table (every cell escaped)."""
    title, header, rows = grid
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h3>{escape(title)}</h3>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def _images(figures: dict[str, bytes]) -> str:
    parts = []
    for name, data in figures.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img alt="{escape(name)}" src="data:image/png;base64,{encoded}">'
                     f"<figcaption>{escape(name)}</figcaption></figure>")
    return "\n".join(parts)


def _checks(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return ""
    fired = [c for c in checks if c["fired"]]
    lines = "".join(f'<p class="alert">ALERT {escape(c["message"])}</p>' for c in fired)
    return "<h2>Checks</h2>\n" + lines + grid_html(checks_grid(checks))


def page(title: str, intro: list[str], grids: list[Grid], figures: dict[str, bytes],
         checks: list[dict[str, Any]] | None = None, verdict: str | None = None,
         notes: list[str] | None = None) -> str:
    """The whole page: no external resources, so it can be mailed or attached to a CI run."""
    body = [f"<h1>{escape(title)}</h1>"]
    if verdict:
        body.append(f'<p class="verdict">{escape(verdict)}</p>')
    body += [f"<p>{escape(line)}</p>" for line in intro]
    body += [f'<p class="note">{escape(n)}</p>' for n in notes or []]
    body.append(_checks(checks or []))
    if figures:
        body.append("<h2>Pictures</h2>\n" + _images(figures))
    body.append("<h2>Tables</h2>")
    body += [grid_html(g) for g in grids]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def scan_html(document: dict[str, Any], figures: dict[str, bytes],
              checks: list[dict[str, Any]] | None = None) -> str:
    """A scan's page: verdict, checks, pictures, every table including the statistics."""
    notes = list((document.get("stats") or {}).get("verdicts", []))
    return page("gradprobe scan", scan_header(document), scan_grids(document), figures, checks,
                document["verdict"], notes)


def compare_html(document: dict[str, Any], figures: dict[str, bytes],
                 checks: list[dict[str, Any]] | None = None) -> str:
    """A comparison's page: gains, drift, relation, and the gain picture."""
    intro = [f"A: {document['a']['path']}"]
    if document["b"] is not None:
        intro.append(f"B: {document['b']['path']}")
    if document["gain_formula"]:
        intro.append(f"gain: {document['gain_formula']}")
    if document["drift"].get("error_note"):
        intro.append(f"drift: {document['drift']['error_note']}")
    return page("gradprobe compare", intro, compare_grids(document), figures, checks,
                notes=document["notes"])
