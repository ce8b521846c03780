"""The probes of a training run as a table: one row per step, each task's share of the update."""

from __future__ import annotations

from rich.table import Table

from gradprobe.series import Series


def _percent(value: float | None) -> str:
    return "-" if value is None else format(value, ".1%")


def render_series(series: Series) -> Table:
    table = Table(title="Share of the mixed update per task, over training steps", title_justify="left")
    table.add_column("step", justify="right")
    for task in series.tasks:
        table.add_column(task, justify="right")
    shares = series.figures["share"]
    for i, step in enumerate(series.steps):
        table.add_row(str(step), *[_percent(shares[task][i]) for task in series.tasks])
    return table
