"""The console view of a scan: per-task table, cosine matrix and verdict, with rich."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gradprobe.views.mix_view import mix_lines


def fmt(value: Any, spec: str = ".3g") -> str:
    """A number for a table cell; '-' for missing values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


ROLLOUT_COLUMNS: list[tuple[str, str, str]] = [
    ("prompts", "n_prompts", "d"),
    ("rollouts", "n_rollouts", "d"),
    ("mean reward", "mean_reward", ".3f"),
    ("reward std", "reward_std", ".3f"),
    ("degenerate", "degenerate_groups", "d"),
    ("mean |A|", "mean_abs_advantage", ".3f"),
    ("mean length", "mean_completion_length", ".1f"),
]
GRADIENT_COLUMNS: list[tuple[str, str | None, str]] = [
    ("grad_norm", "grad_norm", ".4g"),
    ("grad_sq_norm", "grad_sq_norm", ".4g"),
    ("unbiased sq norm (95% CI)", None, ""),
    ("norm_ratio", "norm_ratio", ".2f"),
    ("share", "share", ".1%"),
]


def _unbiased_cell(task: dict[str, Any]) -> str:
    value = task.get("grad_sq_norm_unbiased")
    lo, hi = task.get("grad_sq_norm_unbiased_ci") or (None, None)
    if value is None:
        return "-"
    interval = f" ({fmt(lo, '.3g')}, {fmt(hi, '.3g')})" if lo is not None else ""
    return f"{value:.3g}{interval}"


def task_table(document: dict[str, Any], title: str, columns: list[tuple[str, str | None, str]]) -> Table:
    """One row per task with the given (header, scan.json key, format) columns."""
    table = Table(title=title, title_justify="left")
    table.add_column("task", style="bold")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for name, task in document["tasks"].items():
        cells = [_unbiased_cell(task) if key is None else fmt(task.get(key), spec)
                 for _, key, spec in columns]
        table.add_row(Text(name), *cells)
    return table


def cosine_table(cosine: dict[str, Any], title: str) -> Table | None:
    tasks = cosine["tasks"]
    if len(tasks) < 2 or all(v is None for i, row in enumerate(cosine["matrix"])
                             for j, v in enumerate(row) if i != j):
        return None
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for task in tasks:
        table.add_column(Text(task), justify="right")
    for task, row in zip(tasks, cosine["matrix"]):
        cells = []
        for value in row:
            text = fmt(value, "+.3f")
            cells.append(f"[red]{text}[/red]" if value is not None and value < 0 else text)
        table.add_row(Text(task), *cells)
    return table


def sign_table(document: dict[str, Any]) -> Table:
    table = Table(title="Sign decomposition (A>0 vs A<0) and noise", title_justify="left")
    for header in ("task", "pos_grad_norm", "neg_grad_norm", "pos/neg", "cos(pos,neg)", "noise_scale"):
        table.add_column(header, justify="right" if header != "task" else "left")
    for name, t in document["tasks"].items():
        table.add_row(Text(name), fmt(t.get("pos_grad_norm"), ".4g"), fmt(t.get("neg_grad_norm"), ".4g"),
                      fmt(t.get("pos_neg_ratio"), ".2f"), fmt(t.get("pos_neg_cosine"), "+.3f"),
                      fmt(t.get("noise_scale"), ".3g"))
    return table


def render_scan(document: dict[str, Any]) -> RenderableType:
    """Everything the console shows for a scan, as one rich renderable."""
    model = document["model"]
    header = Text.assemble(
        ("gradprobe scan", "bold"), f"  model {model['path']}  ({model['n_selected_parameters']:,} of "
        f"{model['n_parameters']:,} parameters, {model['dtype']} on {model['device']})\n",
        f"advantage {document['advantage']['name']}: {document['advantage']['formula']};  "
        f"loss {document['loss']['name']}: {document['loss']['formula']}",
        *(f"\n{line}" for line in mix_lines(document.get("mix"))),
    )
    parts: list[RenderableType] = [
        header,
        task_table(document, "Rollouts per task", ROLLOUT_COLUMNS),
        task_table(document, "Per-task gradients", GRADIENT_COLUMNS),
    ]
    for key, title in (("cosine", "Task-gradient cosines"),
                       ("cosine_unbiased", "Bias-corrected cosines g_s.g_t / sqrt(U_s U_t)")):
        table = cosine_table(document[key], title)
        if table is not None:
            parts.append(table)
    parts.append(sign_table(document))
    if "stats" in document and document["stats"]:
        from gradprobe.views.stats_view import render_stats

        parts.extend(render_stats(document["stats"]))
    fidelity = document.get("proxy_fidelity")
    if fidelity:
        parts.append(Text(
            f"Proxy fidelity of --params {' '.join(fidelity['params'])} against all parameters: "
            f"Spearman {fmt(fidelity['spearman'], '.2f')} across {fidelity['n_tasks']} tasks, "
            f"max norm-ratio error {fmt(fidelity['max_ratio_error'], '.1%')}."))
    parts.append(Text(document["verdict"], style="bold yellow"))
    unbiased_negative = [t for t, v in document["tasks"].items()
                         if v.get("grad_sq_norm_unbiased") is not None and v["grad_sq_norm_unbiased"] <= 0]
    if unbiased_negative:
        parts.append(Text(
            f"Unbiased squared norm <= 0 for {', '.join(unbiased_negative)}: its gradient signal is "
            "below the noise of this sample; use more prompts.", style="yellow"))
    return Group(*parts)


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
