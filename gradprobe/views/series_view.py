"""The probes of a training run as a table: one row per step, each task's share of the update."""

from __future__ import annotations

from rich.table import Table

from gradprobe.series import Series
from gradprobe.views.console import fmt


def render_series(series: Series) -> Table:
    table = Table(title="Share of the mixed update per task, over training steps", title_justify="left")
    table.add_column("step", justify="right")
    for task in series.tasks:
        table.add_column(task, justify="right")
    shares = series.figures["share"]
    for i, step in enumerate(series.steps):
        table.add_row(str(step), *[fmt(shares[task][i], ".1%") for task in series.tasks])
    return table
