"""The report model as one self-contained HTML page, its PNGs base64-embedded."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from gradprobe.views.model import Report, Section, checks_section, compare_report, scan_report

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
.legend { color: #57606a; font-size: 0.85em; margin: -1em 0 0.3em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
"""


def section_html(section: Section) -> str:
    """One section as a heading, an HTML table and its legend (every cell escaped)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in section.header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in section.rows)
    legend = "".join(f'<p class="legend">{escape(line)}</p>' for line in section.legend)
    return (f"<h3>{escape(section.title)}</h3>\n<table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>\n{legend}")


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
    return "<h2>Checks</h2>\n" + lines + section_html(checks_section(checks))


def page(report: Report, figures: dict[str, bytes], checks: list[dict[str, Any]] | None = None) -> str:
    """The whole page: no external resources, so it can be mailed or attached to a CI run."""
    body = [f"<h1>{escape(report.title)}</h1>"]
    if report.headline:
        body.append(f'<p class="verdict">{escape(report.headline)}</p>')
    if report.findings:
        body.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in report.findings) + "</ul>")
    body += [f'<p class="note">Caveat: {escape(line)}</p>' for line in report.caveats]
    body += [f"<p>{escape(line)}</p>" for line in report.context]
    body.append(_checks(checks or []))
    if figures:
        body.append("<h2>Pictures</h2>\n" + _images(figures))
    body.append("<h2>Tables</h2>")
    body += [section_html(section) for section in report.sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(report.title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def scan_html(document: dict[str, Any], figures: dict[str, bytes],
              checks: list[dict[str, Any]] | None = None) -> str:
    """A scan's page: verdict, findings, caveats, checks, pictures, every table."""
    return page(scan_report(document), figures, checks)


def compare_html(document: dict[str, Any], figures: dict[str, bytes],
                 checks: list[dict[str, Any]] | None = None) -> str:
    """A comparison's page: caveats, gains, drift, relation, and the gain picture."""
    return page(compare_report(document), figures, checks)
