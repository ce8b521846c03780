"""The plain data the mix stage hands on: task-labelled prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of one task: the text or chat messages, the reference answer, extra columns.

    The answer is kept as the data stores it: text, or a structure (verl's countdown ground
    truth is a dict, some are lists); `answer_text` gives it as text.
    """

    task: str
    prompt_id: str
    prompt: str | list[dict[str, Any]]
    answer: Any
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSource:
    """Where one task's prompts came from and how they are read and scored.

    `convention` is the column convention detected (or set): ``gradprobe``, ``verl`` or ``trl``;
    `fields` maps the roles task/prompt/answer to the columns read (``None``: no such column).
    `reward` and `reward_weights` come from a mix spec (empty: the command line decides), and
    `weight` is the task's mixing weight (1.0 unless a spec sets one).
    """

    task: str
    data: str
    format: str
    convention: str
    fields: dict[str, str | None]
    count: int
    reward: list[str] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)
    reward_options: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


@dataclass(frozen=True)
class Mix:
    """A task-labelled prompt set and where it came from (`sources`: one entry per task).

    `notes` are advice about how it was read (a column that looks like the task's); `split` is
    the split read from a folder with splits (None otherwise).
    """

    records: list[PromptRecord]
    source: Path
    format: str
    sha256: str
    fields: dict[str, str | None]
    sources: dict[str, TaskSource] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    split: str | None = None

    def describe(self) -> dict[str, Any]:
        """How the mix was read, as plain data (scan.json's ``mix``)."""
        return {"path": str(self.source), "sha256": self.sha256, "format": self.format,
                "split": self.split, "fields": self.fields,
                "tasks": {t: asdict(s) for t, s in self.sources.items()}, "notes": self.notes}

    @property
    def weights(self) -> dict[str, float]:
        """Each task's mixing weight (1.0 where nothing set one)."""
        return {t: self.sources[t].weight if t in self.sources else 1.0 for t in self.tasks}

    @property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance."""
        return list(dict.fromkeys(r.task for r in self.records))

    def by_task(self) -> dict[str, list[PromptRecord]]:
        grouped: dict[str, list[PromptRecord]] = {t: [] for t in self.tasks}
        for record in self.records:
            grouped[record.task].append(record)
        return grouped
