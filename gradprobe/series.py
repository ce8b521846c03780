"""A training run's probes over steps: gradprobe.jsonl (one line per probe) read back.

`GradprobeCallback` appends one line per probe: the step, and per task its gradient figures.
`gradprobe report gradprobe.jsonl` shows the series as a table and, with --plots, draws each
task's share of the mixed update over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.jsonl import json_objects

SERIES_FIGURES = ("share", "grad_norm", "grad_sq_norm_unbiased")


@dataclass
class Series:
    """Per task, one value per probe step of each figure (None where the task was absent)."""

    steps: list[int]
    tasks: list[str]
    figures: dict[str, dict[str, list[float | None]]]
    """figure -> task -> values, aligned with `steps`."""

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "tasks": self.tasks, "figures": self.figures}


def read_series(path: Path) -> Series:
    """The probes of a gradprobe.jsonl, in file order; one-line errors (file and line) for lines
    that are not JSON objects (`gradprobe.jsonl.json_objects`) or not probes."""
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, record in json_objects(path, lines):
            tasks = record.get("tasks")
            if not _is_step(record.get("step")) or not isinstance(tasks, dict) or not all(
                    isinstance(figures, dict) for figures in tasks.values()):
                raise UserInputError(f"{path}:{number}: not a gradprobe probe line (needs step and tasks, "
                                     "as GradprobeCallback writes them)")
            records.append(record)
    if not records:
        raise UserInputError(f"{path}: no probes in the file")
    tasks = sorted({task for record in records for task in record["tasks"]})
    figures = {figure: {task: [record["tasks"].get(task, {}).get(figure) for record in records] for task in tasks}
               for figure in SERIES_FIGURES}
    return Series([int(record["step"]) for record in records], tasks, figures)


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
