"""Trainers' rollout dumps, read as they are written, turned into gradprobe rollouts.

Two formats, told apart by their columns:

- verl (`trainer.rollout_data_dir`, `RayPPOTrainer._log_rollout_data`): `{step}.jsonl`, one row
  per completion with `input` and `output` decoded with special tokens skipped (the chat
  template's markers are gone), `gts`, `score`, `step` and the reward's extra fields; no
  data_source, no group id, no token ids. Each `input` is mapped back to its mix row (task and
  prompt as the model saw it) by rendering every mix prompt with the checkpoint's tokenizer and
  decoding it the same way; completions of one prompt form its group. Rows that match no mix row,
  or rows of several tasks, are counted as unmatched and left out.
- trl: what `GradprobeCallback(dump_rollouts=True)` writes during a TRL run (TRL itself keeps
  no rollouts on disk): `gradprobe_rollouts/{step}.jsonl`, one row per completion with `task`,
  `prompt` (the text as the model saw it), `completion`, `reward`, `step`, `prompt_id`, and the
  exact `prompt_token_ids` and `completion_token_ids`, which are used as they are. Only `task`,
  `prompt`, `completion` and `reward` are required; without `prompt_id` each distinct prompt
  text is one group, without token ids the prompt is tokenized without adding special tokens,
  as GRPOTrainer does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.jsonl import json_objects
from gradprobe.mix.conventions import answer_text

VERL_COLUMNS = ("input", "output", "score")
TRL_COLUMNS = ("task", "prompt", "completion", "reward")


@dataclass
class Dump:
    """One dump file's rows and the format they were written in (`verl` or `trl`)."""

    path: Path
    format: str
    rows: list[dict[str, Any]]


@dataclass
class ConvertedDump:
    """A dump as gradprobe rollout rows (read_rollouts' columns), with what could not be used."""

    rollouts: list[dict[str, Any]]
    n_rows: int
    n_unmatched: int
    n_ambiguous: int = 0
    reward_rows: list[tuple[float, str, float]] = field(default_factory=list)


def read_dump(path: Path) -> Dump:
    """The rows of one dump file and its format, from the columns of its first row."""
    path = Path(path)
    rows = [row for _, row in json_objects(path, path.read_text(encoding="utf-8").splitlines())]
    if not rows:
        raise UserInputError(f"{path}: the rollout dump has no rows")
    first = set(rows[0])
    if all(c in first for c in VERL_COLUMNS):
        return Dump(path, "verl", rows)
    if all(c in first for c in TRL_COLUMNS):
        return Dump(path, "trl", rows)
    raise UserInputError(f"{path}: not a rollout dump: verl's has {', '.join(VERL_COLUMNS)}; the TRL "
                         f"callback's has {', '.join(TRL_COLUMNS)}")


@dataclass(frozen=True)
class MixPrompt:
    """A mix row as the model saw it: its task, id, rendered text and token ids."""

    task: str
    prompt_id: str
    text: str
    token_ids: tuple[int, ...]
    answer: Any


class MixIndex:
    """Mix rows keyed by their prompt decoded with special tokens skipped (verl's `input`)."""

    def __init__(self, mix: Any, tokenizer: Any) -> None:
        from gradprobe.mix import render_prompt
        from gradprobe.rollouts import encode_prompt

        self._by_text: dict[str, list[MixPrompt]] = {}
        for record in mix.records:
            rendered = render_prompt(tokenizer, record.prompt)
            ids = encode_prompt(tokenizer, record, rendered)
            prompt = MixPrompt(record.task, record.prompt_id, rendered, tuple(ids), record.answer)
            self._by_text.setdefault(_key(tokenizer.decode(ids, skip_special_tokens=True)), []).append(prompt)

    def lookup(self, decoded: str) -> tuple[MixPrompt | None, bool]:
        """The mix row whose decoded prompt is `decoded` (whitespace at the ends ignored), and
        whether the text belongs to rows of more than one task (then no row is returned)."""
        found = self._by_text.get(_key(decoded), [])
        if len({p.task for p in found}) > 1:
            return None, True
        return (found[0] if found else None), False


def _key(text: str) -> str:
    return text.strip()


def _reward(value: Any, path: Path, number: int, column: str) -> float:
    try:
        reward = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{path}: row {number}: {column} must be a number") from None
    if not math.isfinite(reward):
        raise UserInputError(f"{path}: row {number}: {column} must be finite")
    return reward


def convert_verl(dump: Dump, index: MixIndex, step: float) -> ConvertedDump:
    """verl rows mapped to their mix rows; the group of a prompt is its rows in the dump."""
    out = ConvertedDump([], len(dump.rows), 0)
    samples: dict[str, int] = {}
    for number, row in enumerate(dump.rows, 1):
        prompt, ambiguous = index.lookup(str(row["input"]))
        if prompt is None:
            out.n_unmatched += 1
            out.n_ambiguous += ambiguous
            continue
        reward = _reward(row["score"], dump.path, number, "score")
        samples[prompt.prompt_id] = samples.get(prompt.prompt_id, -1) + 1
        out.rollouts.append({
            "task": prompt.task, "prompt_id": prompt.prompt_id, "sample": samples[prompt.prompt_id],
            "prompt": prompt.text, "prompt_token_ids": list(prompt.token_ids),
            "completion": str(row["output"]), "reward": reward,
            "answer": answer_text(row.get("gts", prompt.answer)),
        })
        out.reward_rows.append((float(row.get("step", step)), prompt.task, reward))
    return out


def convert_trl(dump: Dump, tokenizer: Any, step: float) -> ConvertedDump:
    """TRL-callback rows as rollouts; a prompt without `prompt_id` gets one per distinct text."""
    out = ConvertedDump([], len(dump.rows), 0)
    ids: dict[tuple[str, str], str] = {}
    samples: dict[tuple[str, str], int] = {}
    for number, row in enumerate(dump.rows, 1):
        missing = [c for c in TRL_COLUMNS if row.get(c) is None or (c in ("task", "prompt") and row[c] == "")]
        if missing:
            raise UserInputError(f"{dump.path}: row {number} has no {', '.join(missing)}")
        task, text = str(row["task"]), str(row["prompt"])
        reward = _reward(row["reward"], dump.path, number, "reward")
        key = (task, str(row["prompt_id"]) if row.get("prompt_id") is not None else text)
        prompt_id = ids.setdefault(key, key[1] if row.get("prompt_id") is not None
                                   else f"{task}-p{sum(k[0] == task for k in ids)}")
        samples[key] = samples.get(key, -1) + 1
        rollout = {
            "task": task, "prompt_id": prompt_id, "sample": samples[key], "prompt": text,
            "prompt_token_ids": row.get("prompt_token_ids") or tokenizer(text, add_special_tokens=False).input_ids,
            "completion": str(row["completion"]), "reward": reward, "answer": answer_text(row.get("answer")),
        }
        if row.get("completion_token_ids"):
            rollout["completion_token_ids"] = row["completion_token_ids"]
        out.rollouts.append(rollout)
        out.reward_rows.append((float(row.get("step", step)), task, reward))
    return out


def convert_dump(dump: Dump, index: MixIndex | None, tokenizer: Any, step: float) -> ConvertedDump:
    """Either format as gradprobe rollouts; verl's needs the mix (`--mix`) to find the tasks."""
    if dump.format == "trl":
        return convert_trl(dump, tokenizer, step)
    if index is None:
        raise UserInputError(f"{dump.path}: verl dumps carry no task; give --mix with the training data "
                             "so each input can be mapped back to its task")
    return convert_verl(dump, index, step)


def write_rollouts(path: Path, rollouts: list[dict[str, Any]]) -> None:
    """The rollout rows as a JSONL file `gradprobe.rollouts.read_rollouts` reads (atomically)."""
    from gradprobe.artifacts import write_text

    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rollouts))


def reward_rows(dump: Dump, index: MixIndex | None, step: float) -> tuple[list[tuple[float, str, float]], int]:
    """(step, task, reward) of every row of a dump (the training reward), and how many verl rows
    matched no mix row; TRL rows carry their task, so nothing is tokenized."""
    if dump.format == "verl":
        converted = convert_dump(dump, index, None, step)
        return converted.reward_rows, converted.n_unmatched
    rows = []
    for number, row in enumerate(dump.rows, 1):
        if row.get("task") in (None, ""):
            raise UserInputError(f"{dump.path}: row {number} has no task")
        rows.append((float(row.get("step", step)), str(row["task"]),
                     _reward(row.get("reward"), dump.path, number, "reward")))
    return rows, 0
