"""Task weights (gradprobe.weights) on the console and as markdown: the table, formula and caution."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

HEADER = ("task", "current weight", "new weight", "share", "||g||^2", "gain", "noise scale")


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def weight_rows(document: dict[str, Any]) -> list[list[str]]:
    """One row per task: its current and new weight beside the figures the policies read."""
    return [[task, _number(row["old_weight"], ".1%"), _number(row["weight"], ".1%"),
             _number(row["inputs"]["share"], ".1%"), _number(row["inputs"]["grad_sq_norm"], ".3g"),
             _number(row["inputs"]["gain"], "+.3f"), _number(row["inputs"]["noise_scale"], ".3g")]
            for task, row in document["tasks"].items()]


def render_weights(document: dict[str, Any]) -> RenderableType:
    """The weights table with the policy's formula and the study's caution."""
    table = Table(title=f"Task weights: {document['policy']} (from the {document['source_kind']} "
                        f"{document['source']})", title_justify="left")
    for i, name in enumerate(HEADER):
        table.add_column(name, style="bold" if i == 0 else None, justify="left" if i == 0 else "right")
    for row in weight_rows(document):
        table.add_row(*row)
    return Group(table, Text(document["formula"], style="dim"), Text(document["caution"], style="yellow"))


def weights_markdown(document: dict[str, Any]) -> str:
    """The same as markdown."""
    out = [f"## Task weights: {document['policy']}", "", f"- formula: `{document['formula']}`",
           f"- source: {document['source_kind']} `{document['source']}`", "", f"> {document['caution']}", "",
           "| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    out += ["| " + " | ".join(row) + " |" for row in weight_rows(document)]
    return "\n".join(out) + "\n"
