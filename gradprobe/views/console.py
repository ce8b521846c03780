"""The console view: the report model as rich tables and text, and the progress bars.

Tables fit an 80-column terminal: cells fold instead of being cut, long headers are abbreviated
in the model with a legend. The verdict, findings and caveats come last, where the eye lands
when the run ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gradprobe.views.model import Report, Section, checks_section, compare_report, gains_report, scan_report


def section_table(section: Section) -> RenderableType:
    """A section as a rich table (first column left, the rest right-aligned) and its legend."""
    table = Table(title=section.title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  title_style="bold")
    for i, header in enumerate(section.header):
        table.add_column(Text(header), justify="left" if i == 0 else "right", overflow="fold")
    for row in section.rows:
        table.add_row(*(Text(str(cell)) for cell in row))  # plain text: "share[code]" is no markup
    if not section.legend:
        return table
    return Group(table, *(Text(line, style="dim") for line in section.legend), Text(""))


def findings_text(findings: list[str]) -> Text:
    """The statistics' sentences, one bullet each."""
    return Text("\n".join(f"- {line}" for line in findings), style="bold")


def render(report: Report) -> RenderableType:
    """A whole report: title and context, the sections, then verdict, findings and caveats."""
    parts: list[RenderableType] = [Text(report.title, style="bold")]
    parts += [Text(line) for line in report.context]
    parts.append(Text(""))
    parts += [section_table(section) for section in report.sections]
    if report.headline:
        parts.append(Text(report.headline, style="bold yellow"))
    if report.findings:
        parts.append(findings_text(report.findings))
    parts += [Text(f"caveat: {line}", style="yellow") for line in report.caveats]
    return Group(*parts)


def render_scan(document: dict[str, Any]) -> RenderableType:
    """Everything the console shows for a scan."""
    return render(scan_report(document))


def render_compare(document: dict[str, Any]) -> RenderableType:
    """Everything the console shows for a comparison."""
    return render(compare_report(document))


def render_gains(document: dict[str, Any]) -> RenderableType:
    """The gains table and its formula."""
    return render(gains_report(document))


def render_checks(checks: list[dict[str, Any]]) -> RenderableType:
    """The checks table and one red line per fired alert."""
    fired = [c for c in checks if c["fired"]]
    lines = [Text(f"ALERT {c['message']}", style="bold red") for c in fired]  # Text: no markup
    summary = (Text(f"{len(fired)} of {len(checks)} --fail-on checks fired", style="bold red") if fired
               else Text(f"all {len(checks)} --fail-on checks passed", style="bold green"))
    return Group(section_table(checks_section(checks)), *lines, summary)


class RichProgress:
    """A `Progress` for the pipeline that draws one rich bar per stage on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            handle = bar.add_task(name, total=total)
            yield lambda n: bar.advance(handle, n)
