"""The plain data the mix stage hands on: task-labelled prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of one task: the text or chat messages, the reference answer, extra columns."""

    task: str
    prompt_id: str
    prompt: str | list[dict[str, Any]]
    answer: str | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mix:
    """A task-labelled prompt set and where it came from."""

    records: list[PromptRecord]
    source: Path
    format: str
    sha256: str
    fields: dict[str, str]

    @property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance."""
        return list(dict.fromkeys(r.task for r in self.records))

    def by_task(self) -> dict[str, list[PromptRecord]]:
        grouped: dict[str, list[PromptRecord]] = {t: [] for t in self.tasks}
        for record in self.records:
            grouped[record.task].append(record)
        return grouped
