"""Reading task-labelled prompt mixes with `datasets`: one small reader per format, registered.

Formats: JSONL, JSON, Parquet, CSV, and directories written by ``Dataset.save_to_disk``. Which
columns hold the task, prompt and answer follows the detected convention (gradprobe, verl, TRL:
`gradprobe.mix.conventions`) and the field mapping; those become `PromptRecord`s, and every other
column travels along as ``extra`` for reward functions. A ``.toml`` mix spec
(`gradprobe.mix.spec`) combines tasks from several files or hub-cache datasets.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradprobe.errors import InputWarning, UserInputError
from gradprobe.jsonl import json_objects
from gradprobe.mix.conventions import CONVENTIONS, detect_convention, field_value, resolve_fields
from gradprobe.mix.records import Mix, PromptRecord, TaskSource
from gradprobe.registry import Registry

if TYPE_CHECKING:
    from gradprobe.mix.folders import TablePart

TableReader = Callable[[Path], Any]  # path -> datasets.Dataset
FORMATS: Registry[TableReader] = Registry("mix format")
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_builder(builder: str, path: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in many types
        raise UserInputError(f"{path}: cannot read as {builder}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's (or its cause's) message, for one-line errors."""
    cause = exc.__cause__ or exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


@FORMATS.register("jsonl")
def read_jsonl(path: Path) -> Any:
    """JSON Lines; a malformed line is reported with its line number before `datasets` reads it."""
    with open(path, encoding="utf-8") as handle:
        for _ in json_objects(path, handle):
            pass
    return _load_builder("json", path)


@FORMATS.register("json")
def read_json(path: Path) -> Any:
    return _load_builder("json", path)


@FORMATS.register("parquet")
def read_parquet(path: Path) -> Any:
    return _load_builder("parquet", path)


@FORMATS.register("csv")
def read_csv(path: Path) -> Any:
    return _load_builder("csv", path)


@FORMATS.register("datasets-dir")
def read_saved_dataset(path: Path) -> Any:
    """A folder written by ``save_to_disk``; of a DatasetDict, the ``train`` split (or the only one)."""
    from gradprobe.mix.folders import read_parts

    return read_parts(path)[0].table


def detect_format(path: Path) -> str:
    """The format name for a path: from its suffix, or a folder saved by datasets, or a folder of
    data files (`gradprobe.mix.folders`)."""
    from gradprobe.mix.folders import is_saved_dataset

    if path.is_dir():
        return "datasets-dir" if is_saved_dataset(path) else "data-folder"
    try:
        return SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise UserInputError(
            f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet, .csv, "
            "a folder of such files, or a folder saved by datasets"
        ) from None


def load_table(path: Path) -> Any:
    """Read one file, or a folder saved by datasets, into a `datasets.Dataset`, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    if not path.is_dir() and not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: not readable (check its permissions)")
    file_format = detect_format(path)
    if file_format == "data-folder":
        raise UserInputError(f"{path}: a folder that datasets did not save; give one file")
    try:
        return FORMATS.get(file_format)(path)
    except UnicodeDecodeError as exc:
        raise UserInputError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None


def content_sha256(path: Path, files: list[Path] | None = None) -> str:
    """SHA-256 of a file, or of a folder's files (all, or `files`) with their names, in name order."""
    path = Path(path)
    if files is None:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


DEFAULT_FIELDS = {"task": "task", "prompt": "prompt", "answer": "answer"}
# Columns pandas adds for its index (to_parquet of a filtered frame, to_csv): never data.
INDEX_COLUMN = re.compile(r"__index_level_\d+__|Unnamed: \d+")
# Column names that often hold a task although not called "task" (a hint suggests --task-field).
TASK_LIKE_COLUMNS = ("data_source", "source", "dataset", "subject", "category", "domain", "task_name")


def load_mix(
    path: Path, task_field: str = "task", prompt_field: str = "prompt", answer_field: str = "answer",
    split: str | None = None,
) -> Mix:
    """Read a mix file or folder (`gradprobe.mix.folders`), or a TOML mix spec, into `PromptRecord`s.

    The column convention (gradprobe, verl, TRL) is detected per file; field names other than
    the defaults replace single roles of it. `split` chooses a folder's split (default train).
    A ``.toml`` path is a mix spec (`gradprobe.mix.spec`).
    """
    from gradprobe.mix.folders import read_parts, unsplit_notes

    path = Path(path)
    given = {"task": task_field, "prompt": prompt_field, "answer": answer_field}
    overrides = {role: name for role, name in given.items() if name != DEFAULT_FIELDS[role]}
    if path.suffix.lower() == ".toml":
        from gradprobe.mix.spec import load_spec

        if overrides or split is not None:
            flags = "field flags" if overrides else "--split"
            raise UserInputError(
                f"{path}: {flags} do not apply to a mix spec; set 'prompt', 'answer' and 'split' "
                "per task in the spec"
            )
        return load_spec(path)
    parts = read_parts(path, split)
    records, sources, notes = _parts_records(path, parts, overrides)
    mix_format = detect_format(path)
    if mix_format == "data-folder":
        notes += unsplit_notes(path)
    digest = content_sha256(path, [p.path for p in parts] if mix_format == "data-folder" else None)
    fields = next(iter(sources.values())).fields
    if any(s.fields != fields for s in sources.values()):
        fields = {}
    return Mix(records, path, mix_format, digest, fields, sources, notes, parts[0].split)


def _parts_records(
    path: Path, parts: list[TablePart], overrides: dict[str, str | None]
) -> tuple[list[PromptRecord], dict[str, TaskSource], list[str]]:
    """All parts' records, one `TaskSource` per task (counting its rows in every file), and
    advice about task-like columns."""
    records: list[PromptRecord] = []
    sources: dict[str, TaskSource] = {}
    files: dict[str, list[str]] = {}
    notes: list[str] = []
    counters: dict[str, int] = {}
    for part in parts:
        part_records, source = table_records(part.table, part.label, overrides, part.task,
                                             counters=counters)
        records += part_records
        if source.fields["task"] is None:
            notes += task_column_hints(part.table, part.label, part.task)
            if len(parts) == 1:  # a folder's layout names its tasks on purpose; one file does not
                warnings.warn(f"{part.label}: no {overrides.get('task') or 'task'!r} column, so every row "
                              f"is one task named {part.task!r}; add a task column to scan several tasks",
                              InputWarning)
        for task in dict.fromkeys(r.task for r in part_records):
            files.setdefault(task, []).append(part.label)
            count = sum(r.task == task for r in part_records)
            known = sources.get(task)
            sources[task] = replace(known, count=known.count + count) if known else replace(
                source, task=task, data=part.label, format=part.format, count=count)
    if not records:
        raise UserInputError(f"{path}: the mix has no rows")
    for task, labels in files.items():
        if len(labels) > 1:
            sources[task] = replace(sources[task], data=f"{path} ({len(labels)} files)")
    return records, sources, notes


def task_column_hints(table: Any, label: str, task: str) -> list[str]:
    """Advice when a table without a task column has a column that looks like one."""
    hints = []
    for column in TASK_LIKE_COLUMNS:
        if column in table.column_names:
            values = table[column]
            if all(isinstance(v, str) for v in values) and len(set(values)) > 1:
                hints.append(
                    f"{label}: no 'task' column, so all its rows are task {task!r}; column "
                    f"{column!r} holds {len(set(values))} names: --task-field {column} makes them the tasks"
                )
    return hints


def table_records(
    table: Any,
    label: str,
    overrides: dict[str, str | None],
    default_task: str,
    convention: str | None = None,
    force_task: bool = False,
    counters: dict[str, int] | None = None,
) -> tuple[list[PromptRecord], TaskSource]:
    """A table's rows as `PromptRecord`s under its (detected) convention, and how they were read.

    Rows without a task column, or every row when `force_task`, belong to `default_task`.
    Columns not mapped to a role travel along as ``extra`` for reward functions, but pandas'
    index columns never do; a column a role reaches into with a dotted path does, unless the
    path is the convention's own (verl's ``reward_model``, which holds only the ground truth).
    The answer is kept as stored (verl's dict or list ground truths stay structures).
    `counters` numbers prompts per task across several tables of one mix.
    """
    columns = list(table.column_names)
    convention = detect_convention(columns, convention)
    fields = resolve_fields(columns, convention, overrides, label)
    if force_task:
        fields["task"] = None
    rules = CONVENTIONS.get(convention)
    handed_on = {"answer"} if rules.answer_in_extra else set()
    used = {name.split(".", 1)[0] for role, name in fields.items()
            if name and role not in handed_on and ("." not in name or rules.fields[role] == name)}
    used |= {c for c in columns if INDEX_COLUMN.fullmatch(c)}
    records = []
    counters = {} if counters is None else counters
    for number, row in enumerate(table, 1):
        task = default_task if fields["task"] is None else row[fields["task"]]
        if task is None or str(task).strip() == "":
            raise UserInputError(f"{label}: row {number} has an empty task")
        task = str(task)
        prompt = field_value(row, fields["prompt"])
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()) or prompt == []:
            raise UserInputError(f"{label}: row {number} (task {task!r}) has an empty prompt")
        counters[task] = counters.get(task, 0) + 1
        extra = {k: v for k, v in row.items() if k not in used}
        prompt_id = str(extra.pop("prompt_id", None) or f"{task}-{counters[task] - 1}")
        records.append(PromptRecord(task, prompt_id, prompt, field_value(row, fields["answer"]), extra))
    source = TaskSource(default_task, label, "", convention, fields, len(records))
    return records, source


def select_prompts(mix: Mix, per_task: int | None, seed: int) -> list[PromptRecord]:
    """A seeded subset with the same number of prompts from every task (all when None).

    Mixed training samples tasks uniformly; equal counts keep the tasks' estimates comparable.
    """
    import random

    grouped = mix.by_task()
    for task, records in grouped.items():
        seen: set[str] = set()
        for record in records:
            if record.prompt_id in seen:
                raise UserInputError(f"task {task!r} has prompt_id {record.prompt_id!r} twice; "
                                     "prompt ids must be unique within a task")
            seen.add(record.prompt_id)
    smallest = min(len(v) for v in grouped.values())
    for task, records in grouped.items():
        if len(records) < 2:
            raise UserInputError(
                f"task {task!r} has {len(records)} prompt; every task needs at least 2 "
                "(the unbiased estimates compare prompts)"
            )
    count = smallest if per_task is None else per_task
    if count < 2:
        raise UserInputError("--prompts-per-task must be at least 2")
    if count > smallest:
        small = min(grouped, key=lambda t: len(grouped[t]))
        raise UserInputError(
            f"--prompts-per-task {count} but task {small!r} has only {smallest} prompts; "
            f"use --prompts-per-task {smallest} or less"
        )
    rng = random.Random(seed)
    chosen = []
    for task in mix.tasks:
        records = grouped[task]
        picks = sorted(rng.sample(range(len(records)), count))
        chosen += [records[i] for i in picks]
    return chosen


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> str:
    """The prompt as the model sees it: chat messages through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "content" in m for m in prompt):
        raise UserInputError(
            "a prompt must be a string or a list of chat messages {role, content}; got "
            f"{type(prompt).__name__}"
        )
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in prompt) + "assistant: "
