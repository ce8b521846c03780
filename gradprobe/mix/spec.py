"""The TOML mix spec: tasks from separate files or hub-cache datasets, each with its own mapping.

    [tasks.math]
    data = "data/math.jsonl"        # a file or folder (`gradprobe.mix.folders`), relative to this spec,
                                    # or a hub dataset id in the local cache ("openai/gsm8k")
    prompt = "question"             # column of the prompt (default: the detected convention's)
    answer = "answer"               # column of the reference answer (dotted paths reach nested ones)
    reward = ["math", "format"]     # one reward, or several summed with `weights`
    weights = [1.0, 0.2]
    mix_weight = 2.0                # the task's weight in the mixed objective (default 1.0)

    [tasks.math.options]            # keyword options for the task's reward functions;
    timeout = 5                     # a sub-table named after a component applies to it alone

Other keys: ``format`` (force a column convention: gradprobe, verl, trl), ``split`` (of a hub
dataset, a folder saved by ``DatasetDict.save_to_disk`` or a folder of data files such as verl's
``data/gsm8k/{train,test}.parquet``; default train) and ``subset`` (hub datasets only). Every row of a task's data belongs to that task. Errors name the
task and the key at fault.

`mix_weight` scales task t's weight w_t in the mixed loss L = sum_t w_t L_t (docs/metrics.md,
"Task gradients"): w_t is proportional to mix_weight_t times the task's completions (or tokens,
for token-mean losses), as if the task were sampled mix_weight times as often. It changes the
mixed gradient and the update shares, not the per-task gradients.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.mix.folders import SplitError, TablePart, read_parts
from gradprobe.mix.loading import SUFFIXES, content_sha256, detect_format, table_records
from gradprobe.mix.records import Mix, PromptRecord, TaskSource
from gradprobe.rewards.composite import CompositeReward, build_composite

# Key -> (accepted types, what to write); the spec's whole vocabulary per task.
TASK_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "data": ((str,), "a path or a hub dataset id"),
    "prompt": ((str,), "a column name"),
    "answer": ((str,), "a column name"),
    "format": ((str,), "gradprobe, verl or trl"),
    "split": ((str,), "a split name such as 'train'"),
    "subset": ((str,), "a dataset configuration name"),
    "reward": ((str, list), "a reward spec or a list of them"),
    "weights": ((list,), "a list of numbers, one per reward"),
    "options": ((dict,), "a table of reward options"),
    "mix_weight": ((int, float), "a positive number"),
}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def load_spec(path: Path) -> Mix:
    """Read a TOML mix spec and every task's data into one `Mix`."""
    path = Path(path)
    document = _parse_toml(path)
    records: list[PromptRecord] = []
    sources: dict[str, TaskSource] = {}
    digests = [_file_digest(path)]
    for task, entry in document["tasks"].items():
        task_records, source, digest = _load_task(path, task, entry)
        records += task_records
        sources[task] = source
        digests.append(digest)
    sha = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return Mix(records, path, "toml", sha, {}, sources)


def task_rewards(mix: Mix) -> dict[str, CompositeReward]:
    """The rewards a mix spec sets, per task (tasks without a ``reward`` key are left out)."""
    return {task: build_composite(s.reward, s.reward_weights, s.reward_options)
            for task, s in mix.sources.items() if s.reward}


def _parse_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserInputError(f"{path}: no such mix spec file")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(document) - {"tasks"})
    if unknown:
        raise UserInputError(
            f"{path}: unknown top-level key {unknown[0]!r}; a spec has only [tasks.NAME] tables"
        )
    tasks = document.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise UserInputError(f"{path}: no tasks; add a table such as [tasks.math] with data = \"math.jsonl\"")
    for task, entry in tasks.items():
        if not isinstance(entry, dict):
            raise UserInputError(f"{path}: tasks.{task} must be a table ([tasks.{task}])")
        _check_keys(path, task, entry)
    return document


def _check_keys(path: Path, task: str, entry: dict[str, Any]) -> None:
    for key, value in entry.items():
        if key not in TASK_KEYS:
            raise UserInputError(
                f"{path}: task {task!r}: unknown key {key!r}; known keys: {', '.join(TASK_KEYS)}"
            )
        types, wanted = TASK_KEYS[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise UserInputError(f"{path}: task {task!r}: key {key!r} must be {wanted}, got {value!r}")
    if "data" not in entry:
        raise UserInputError(f"{path}: task {task!r}: missing key 'data' (the task's prompt file)")


def _load_task(path: Path, task: str, entry: dict[str, Any]) -> tuple[list[PromptRecord], TaskSource, str]:
    def fail(key: str, message: str) -> UserInputError:
        return UserInputError(f"{path}: task {task!r}: key {key!r}: {message}")

    parts, digest = _task_parts(path, task, entry, fail)
    overrides = {role: entry.get(role) for role in ("prompt", "answer")}
    records: list[PromptRecord] = []
    counters: dict[str, int] = {}
    for part in parts:
        try:
            part_records, source = table_records(part.table, part.label, overrides, task,
                                                 entry.get("format"), force_task=True, counters=counters)
        except UserInputError as exc:
            key = next((k for k in ("format", "prompt", "answer") if repr(entry.get(k)) in str(exc)), "data")
            raise fail(key, str(exc)) from None
        records += part_records
        if part is parts[0]:
            first = source
    if not records:
        raise fail("data", f"{entry['data']} has no rows")
    rewards, weights, options = _reward_entry(entry, fail)
    weight = float(entry.get("mix_weight", 1.0))
    if not (math.isfinite(weight) and weight > 0):
        raise fail("mix_weight", f"must be a positive number, got {weight}")
    label = parts[0].label if len(parts) == 1 else f"{entry['data']} ({len(parts)} files)"
    source = replace(first, data=label, format=parts[0].format, count=len(records), reward=rewards,
                     reward_weights=weights, reward_options=options, weight=weight)
    return records, source, f"{task}:{digest}"


def _task_parts(path: Path, task: str, entry: dict[str, Any], fail: Any) -> tuple[list[TablePart], str]:
    """The task's tables (one, or a data folder's files) and a content digest."""
    data = entry["data"]
    local = path.parent / Path(data).expanduser()  # an absolute path stays as it is
    if local.exists() or not _HUB_ID.match(data) or Path(data).suffix.lower() in SUFFIXES:
        if "subset" in entry:
            raise fail("subset", "applies to hub datasets only; this task's data is local")
        try:
            parts = read_parts(local, entry.get("split"), how="the 'split' key")
        except SplitError as exc:
            raise fail("split", str(exc)) from None
        except UserInputError as exc:
            raise fail("data", str(exc)) from None
        files = [p.path for p in parts] if detect_format(local) == "data-folder" else None
        parts = [replace(p, label=_relative_label(p.label, path.parent)) for p in parts]
        return parts, content_sha256(local, files)
    part = _hub_part(data, task, entry, fail)
    return [part], str(getattr(part.table, "_fingerprint", data))


def _relative_label(label: str, base: Path) -> str:
    """A label as the spec's reader wrote it: relative to the spec's folder when inside it."""
    try:
        return str(Path(label).relative_to(base))
    except ValueError:
        return label


def _hub_part(data: str, task: str, entry: dict[str, Any], fail: Any) -> TablePart:
    """A hub dataset from the local caches only: the hub's file cache (``huggingface-cli
    download --repo-type dataset``), else the datasets cache of an earlier ``load_dataset``."""
    import datasets

    datasets.disable_progress_bars()
    split = entry.get("split", "train")
    source = _cached_snapshot(data) or data
    try:
        table = datasets.load_dataset(source, entry.get("subset"), split=split)
    except Exception as exc:  # datasets raises many types for "not cached" and bad splits
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise fail(
            "data",
            f"{data!r} is neither a file next to the spec nor a dataset (split {split!r}) in the "
            f"local Hugging Face cache ({type(exc).__name__}: {first}); gradprobe never "
            "downloads: fetch it first, or point 'data' at a file",
        ) from None
    return TablePart(table, f"{data}[{split}]", "hub-dataset", task, None, split)


def _cached_snapshot(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except Exception:  # not in the hub cache (or not a valid id): try the datasets cache
        return None


def _reward_entry(entry: dict[str, Any], fail: Any) -> tuple[list[str], list[float], dict[str, Any]]:
    reward = entry.get("reward", [])
    rewards = [reward] if isinstance(reward, str) else list(reward)
    if not all(isinstance(r, str) and r for r in rewards):
        raise fail("reward", f"must be reward names such as \"math\", got {reward!r}")
    weights = entry.get("weights")
    if weights is not None:
        if not rewards:
            raise fail("weights", "given without 'reward'")
        if len(weights) != len(rewards) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise fail("weights", f"needs one finite number per reward ({len(rewards)}), got {weights!r}")
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(rewards)
    options = dict(entry.get("options", {}))
    if rewards:
        try:
            build_composite(rewards, weights, options)
        except UserInputError as exc:
            raise fail("reward", str(exc)) from None
    return rewards, weights, options


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
