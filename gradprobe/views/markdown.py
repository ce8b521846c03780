"""The report model as GitHub markdown, for a pull-request comment: the verdict and what the
statistics say first, then the caveats, then the tables."""

from __future__ import annotations

from typing import Any

from gradprobe.views.model import Report, Section, checks_section, compare_report, gains_report, scan_report


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def section_markdown(section: Section, level: int = 3) -> str:
    """One section as a heading, a markdown table and its legend."""
    lines = [f"{'#' * level} {_cell(section.title)}", "",
             "| " + " | ".join(map(_cell, section.header)) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(section.header) - 1)) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in section.rows]
    if section.legend:
        lines += [""] + [f"<sub>{_cell(line)}</sub>  " for line in section.legend]
    return "\n".join(lines) + "\n"


def _checks_markdown(checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return []
    fired = [c for c in checks if c["fired"]]
    out = ["## Checks", ""]
    out += [f"- :x: **{_cell(c['message'])}**" for c in fired]
    out += [f"- {len(fired)} of {len(checks)} `--fail-on` checks fired" if fired
            else f"- all {len(checks)} `--fail-on` checks passed", ""]
    out.append(section_markdown(checks_section(checks)))
    return out


def report_markdown(report: Report, checks: list[dict[str, Any]] | None = None) -> str:
    """A whole report: verdict, findings, caveats, context, checks, then every section."""
    out = [f"## {report.title}", ""]
    if report.headline:
        out += [f"**{_cell(report.headline)}**", ""]
    if report.findings:
        out += [f"- {_cell(line)}" for line in report.findings] + [""]
    if report.caveats:
        out += [f"> **Caveat:** {_cell(line)}" + ("  " if i < len(report.caveats) - 1 else "")
                for i, line in enumerate(report.caveats)] + [""]
    out += [f"- {_cell(line)}" for line in report.context] + [""]
    out += _checks_markdown(checks or [])
    out += [section_markdown(section) for section in report.sections]
    return "\n".join(out).rstrip() + "\n"


def scan_markdown(document: dict[str, Any], checks: list[dict[str, Any]] | None = None) -> str:
    """A scan as markdown."""
    return report_markdown(scan_report(document), checks)


def compare_markdown(document: dict[str, Any], checks: list[dict[str, Any]] | None = None) -> str:
    """A comparison as markdown."""
    return report_markdown(compare_report(document), checks)


def gains_markdown(document: dict[str, Any]) -> str:
    """The windowed gains as markdown."""
    return report_markdown(gains_report(document))
