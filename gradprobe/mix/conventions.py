"""Column conventions: which columns hold a row's task, prompt and answer, detected from a table.

A file format (`FORMATS`) says how to read a file into a table; a convention says what its
columns mean. Conventions are detected from the column names, first match by `priority`:

- ``gradprobe``: a ``task`` column, ``prompt`` (string or chat messages) and ``answer``.
- ``verl``: verl's RL datasets: ``data_source`` is the task, ``prompt`` a list of chat messages,
  ``reward_model.ground_truth`` the answer (a nested column, read as it is).
- ``trl``: TRL's prompt-only datasets: ``prompt`` (string or chat messages) and no task column,
  so the whole table is one task (named after the file, or by the mix spec). The answer is the
  first of ``answer``, ``solution``, ``ground_truth`` present, or none; every other column goes
  to the reward functions as keyword arguments, as TRL hands them (the answer column too).

A field name may be a dotted path into a nested column (``reward_model.ground_truth``). Field
flags (``--answer-field``) replace single roles of the detected convention.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.registry import Registry

ROLES = ("task", "prompt", "answer")
# A role's column: one name, or candidates (the first present wins; none present: no column).
FieldRule = str | tuple[str, ...]


@dataclass(frozen=True)
class Convention:
    """How one family of datasets lays out its columns."""

    detect: Callable[[set[str]], bool]
    fields: dict[str, FieldRule]
    priority: int
    description: str
    answer_in_extra: bool = False
    """Whether the answer column also reaches reward functions under its own name (TRL does)."""


CONVENTIONS: Registry[Convention] = Registry("mix convention")

CONVENTIONS.register("gradprobe")(Convention(
    detect=lambda columns: "task" in columns,
    fields={"task": "task", "prompt": "prompt", "answer": "answer"},
    priority=0,
    description="task, prompt and answer columns",
))
CONVENTIONS.register("verl")(Convention(
    detect=lambda columns: {"data_source", "prompt", "reward_model"} <= columns,
    fields={"task": "data_source", "prompt": "prompt", "answer": "reward_model.ground_truth"},
    priority=1,
    description="verl RL Parquet: data_source, prompt (chat), reward_model.ground_truth",
))
CONVENTIONS.register("trl")(Convention(
    detect=lambda columns: True,
    fields={"task": (), "prompt": "prompt", "answer": ("answer", "solution", "ground_truth")},
    priority=9,
    description="TRL prompt dataset: one task per table, extra columns to reward functions",
    answer_in_extra=True,
))


def detect_convention(columns: list[str], name: str | None = None) -> str:
    """The convention a table's columns follow, or check the one named (``format`` in a spec)."""
    if name is not None:
        CONVENTIONS.get(name)
        return name
    present = set(columns)
    ordered = sorted(CONVENTIONS, key=lambda n: CONVENTIONS.get(n).priority)
    return next(n for n in ordered if CONVENTIONS.get(n).detect(present))


def has_field(columns: list[str], name: str) -> bool:
    """Whether `name` is a column, or a dotted path whose first part is one."""
    return name in columns or name.split(".", 1)[0] in columns


def resolve_fields(
    columns: list[str], convention: str, overrides: Mapping[str, str | None], label: str
) -> dict[str, str | None]:
    """Role -> column for a table: the convention's defaults with `overrides` on top.

    A column named by an override, or a required (single-name) default, must exist; candidate
    defaults fall back to none. Errors name the column, the flag or key to fix, and the columns.
    """
    rules = CONVENTIONS.get(convention).fields
    fields: dict[str, str | None] = {}
    for role in ROLES:
        rule = overrides.get(role) or rules[role]
        if isinstance(rule, tuple):
            fields[role] = next((c for c in rule if has_field(columns, c)), None)
        elif has_field(columns, rule):
            fields[role] = rule
        else:
            raise UserInputError(
                f"{label}: missing column {rule!r} for the {role} (--{role}-field, or the "
                f"spec's {role!r} key){_convention_hint(convention, overrides)}; columns are "
                f"{', '.join(columns)}"
            )
    return fields


def _convention_hint(convention: str, overrides: Mapping[str, str | None]) -> str:
    if convention == "trl" and not overrides.get("task"):
        return "; with no 'task' column it reads as one TRL-style task (name one with --task-field)"
    return f"; read as the {convention} convention"


def field_value(row: Mapping[str, Any], name: str | None) -> Any:
    """A row's value for a column or a dotted path into nested columns (None when absent)."""
    if name is None:
        return None
    if name in row:
        return row[name]
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def answer_text(value: Any) -> str | None:
    """A reference answer as text: strings as they are, structures (verl's dicts) as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)
