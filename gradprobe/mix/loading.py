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
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from gradprobe.errors import InputWarning, UserInputError
from gradprobe.jsonl import json_objects
from gradprobe.mix.conventions import CONVENTIONS, answer_text, detect_convention, field_value, resolve_fields
from gradprobe.mix.records import Mix, PromptRecord, TaskSource
from gradprobe.registry import Registry

TableReader = Callable[[Path], Any]  # path -> datasets.Dataset
FORMATS: Registry[TableReader] = Registry("mix format")
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_builder(builder: str, path: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors in many types
        raise UserInputError(f"{path}: cannot read as {builder}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
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
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserInputError(f"{path}: not a directory saved by datasets ({_first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UserInputError(f"{path}: holds splits {list(loaded)}; point at one split's folder")
        loaded = next(iter(loaded.values()))
    return loaded


def detect_format(path: Path) -> str:
    """The format name for a path, from its suffix or from being a directory."""
    if path.is_dir():
        return "datasets-dir"
    try:
        return SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise UserInputError(
            f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet, .csv "
            "or a directory saved by datasets"
        ) from None


def load_table(path: Path) -> Any:
    """Read any supported file into a `datasets.Dataset`, with clear errors for bad paths."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    if not path.is_dir() and not os.access(path, os.R_OK):
        raise UserInputError(f"{path}: not readable (check its permissions)")
    try:
        return FORMATS.get(detect_format(path))(path)
    except UnicodeDecodeError as exc:
        raise UserInputError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None


def content_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


DEFAULT_FIELDS = {"task": "task", "prompt": "prompt", "answer": "answer"}


def load_mix(
    path: Path, task_field: str = "task", prompt_field: str = "prompt", answer_field: str = "answer"
) -> Mix:
    """Read a mix file, or a TOML mix spec, into `PromptRecord`s.

    The column convention (gradprobe, verl, TRL) is detected; field names other than the
    defaults replace single roles of it. A ``.toml`` path is a mix spec (`gradprobe.mix.spec`).
    """
    path = Path(path)
    given = {"task": task_field, "prompt": prompt_field, "answer": answer_field}
    overrides = {role: name for role, name in given.items() if name != DEFAULT_FIELDS[role]}
    if path.suffix.lower() == ".toml":
        from gradprobe.mix.spec import load_spec

        if overrides:
            raise UserInputError(
                f"{path}: field flags do not apply to a mix spec; set 'prompt' and 'answer' "
                "per task in the spec"
            )
        return load_spec(path)
    table = load_table(path)
    records, source = table_records(table, str(path), overrides, default_task=path.stem)
    if source.fields.get("task") is None:
        warnings.warn(f"{path}: no {task_field!r} column, so every row is one task named "
                      f"{path.stem!r}; add a task column to scan several tasks", InputWarning)
    source = replace(source, data=str(path), format=detect_format(path))
    if not records:
        raise UserInputError(f"{path}: the mix has no rows")
    sources = {task: replace(source, task=task, count=sum(r.task == task for r in records))
               for task in dict.fromkeys(r.task for r in records)}
    return Mix(records, path, detect_format(path), content_sha256(path), source.fields, sources)


def table_records(
    table: Any,
    label: str,
    overrides: dict[str, str | None],
    default_task: str,
    convention: str | None = None,
    force_task: bool = False,
) -> tuple[list[PromptRecord], TaskSource]:
    """A table's rows as `PromptRecord`s under its (detected) convention, and how they were read.

    Rows without a task column, or every row when `force_task`, belong to `default_task`.
    Columns not mapped to a role travel along as ``extra`` for reward functions.
    """
    columns = list(table.column_names)
    convention = detect_convention(columns, convention)
    fields = resolve_fields(columns, convention, overrides, label)
    if force_task:
        fields["task"] = None
    handed_on = {"answer"} if CONVENTIONS.get(convention).answer_in_extra else set()
    used = {name.split(".", 1)[0] for role, name in fields.items() if name and role not in handed_on}
    records = []
    counters: dict[str, int] = {}
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
        answer = answer_text(field_value(row, fields["answer"]))
        records.append(PromptRecord(task, prompt_id, prompt, answer, extra))
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
