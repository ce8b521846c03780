"""Learning gains: between two scans, and windowed from a training log (docs/metrics.md, "Learning gains").

- Between scans A (before) and B (after): gain_t = mean reward of task t under B minus under A,
  on the same prompts (the prompts both scans have; a task with none in common falls back to its
  overall means, and says so).
- From a log of (step, task, reward) rows, with R_t(s) the mean reward of task t's rows at step s:
      gain_t(s) = mean(R_t over steps s+1..s+w) - mean(R_t over steps s-w..s-1)
  (window w, `--window`), the means over the steps of the window that have rows for the task.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from gradprobe import artifacts
from gradprobe.errors import UserInputError
from gradprobe.jsonl import json_objects

LOG_FIELDS = ("step", "task", "reward")


def scan_gains(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: mean rewards under A and B over their shared prompts and gain = B - A.

    Prompt means are weighted by their number of rollouts, as scan.json's task `mean_reward` is.
    """
    out = {}
    for task in a["tasks"]:
        rows_a = {r["prompt_id"]: r for r in a["prompts"] if r["task"] == task}
        rows_b = {r["prompt_id"]: r for r in b["prompts"] if r["task"] == task}
        shared = [p for p in rows_a if p in rows_b]
        if shared:
            mean_a = _weighted([rows_a[p] for p in shared])
            mean_b = _weighted([rows_b[p] for p in shared])
            note = None if len(shared) == len(rows_a) == len(rows_b) else (
                f"{len(shared)} of {len(rows_a)}/{len(rows_b)} prompts shared; gain over those")
        else:
            mean_a, mean_b = a["tasks"][task]["mean_reward"], b["tasks"][task]["mean_reward"]
            note = "no prompts in common: gain of the two scans' overall means"
        out[task] = {"mean_reward_a": mean_a, "mean_reward_b": mean_b, "gain": mean_b - mean_a,
                     "n_prompts_compared": len(shared), "gain_note": note}
    return out


def _weighted(rows: list[dict[str, Any]]) -> float:
    return float(np.average([r["mean_reward"] for r in rows], weights=[r["n_rollouts"] for r in rows]))


def read_log(path: Path, step_field: str = "step", task_field: str = "task",
             reward_field: str = "reward") -> list[tuple[float, str, float]]:
    """(step, task, reward) rows of a CSV or JSONL training log, with the line of any bad row."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    fields = (step_field, task_field, reward_field)
    rows: list[tuple[float, str, float]] = []
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = [f for f in fields if f not in (reader.fieldnames or [])]
        if missing:
            raise UserInputError(f"{path}: missing column(s) {', '.join(missing)}; the log needs "
                                 f"{', '.join(fields)} (rename with --step-field/--task-field/--reward-field)")
        records = ((i + 2, row) for i, row in enumerate(reader))
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        records = json_objects(path, text.splitlines())
    else:
        raise UserInputError(f"{path}: a training log must be .csv or .jsonl")
    for line, row in records:
        missing = [f for f in fields if row.get(f) in (None, "")]
        if missing:
            raise UserInputError(f"{path}:{line}: no {', '.join(missing)} (the log needs "
                                 f"{', '.join(fields)}; rename with --step-field/--task-field/--reward-field)")
        try:
            step, reward = float(row[step_field]), float(row[reward_field])
        except (TypeError, ValueError):
            raise UserInputError(f"{path}:{line}: step and reward must be numbers") from None
        if not (math.isfinite(step) and math.isfinite(reward)):
            raise UserInputError(f"{path}:{line}: step and reward must be finite numbers")
        rows.append((step, str(row[task_field]), reward))
    if not rows:
        raise UserInputError(f"{path}: the log has no rows")
    return rows


def step_means(rows: list[tuple[float, str, float]]) -> dict[str, dict[float, float]]:
    """R_t(s): per task, the mean reward of its rows at each step."""
    sums: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for step, task, reward in rows:
        sums[task][step].append(reward)
    return {task: {s: float(np.mean(v)) for s, v in sorted(steps.items())} for task, steps in sums.items()}


def windowed_gain(series: dict[float, float], step: float, window: int) -> dict[str, Any]:
    """gain_t(s) = mean(R_t(s+1..s+w)) - mean(R_t(s-w..s-1)) over the logged steps in each window."""
    return _windowed(_Series(series), step, window)


class _Series:
    """R_t(s) as sorted arrays with prefix sums, so each window mean costs two binary searches."""

    def __init__(self, series: dict[float, float]) -> None:
        self.steps = np.array(sorted(series), dtype=float)
        self.cumsum = np.concatenate([[0.0], np.cumsum([series[s] for s in sorted(series)])])

    def window_mean(self, lo: float, hi: float) -> tuple[float | None, int]:
        i, j = np.searchsorted(self.steps, lo, "left"), np.searchsorted(self.steps, hi, "right")
        n = int(j - i)
        return (float((self.cumsum[j] - self.cumsum[i]) / n) if n else None), n


def _windowed(series: _Series, step: float, window: int) -> dict[str, Any]:
    before, n_before = series.window_mean(step - window, step - 1)
    after, n_after = series.window_mean(step + 1, step + window)
    gain = after - before if before is not None and after is not None else None
    return {"step": step, "gain": gain, "before_mean": before, "after_mean": after,
            "n_before_steps": n_before, "n_after_steps": n_after}


def _clean_step(step: float) -> float | int:
    return int(step) if float(step).is_integer() else step


def log_gains(rows: list[tuple[float, str, float]], window: int, step: float | None = None,
              source: str | None = None) -> dict[str, Any]:
    """The gains document: per task the windowed gain at `step` and its series over all steps.

    Without `step`: the earliest logged step s >= first step + w (a whole window of log before it)
    at which every task has rows in both windows, else the earliest with rows in both; that is
    the start of training, where a scan of the initial checkpoint sits.
    """
    if window < 1:
        raise UserInputError("--window must be at least 1 step")
    series = {task: _Series(values) for task, values in step_means(rows).items()}
    steps = sorted({s for s, _, _ in rows})
    if step is None:
        ok = [s for s in steps if all(_windowed(series[t], s, window)["gain"] is not None for t in series)]
        full = [s for s in ok if s >= steps[0] + window] or ok
        if not full:
            raise UserInputError(
                f"no step has logged rewards of every task within {window} steps before and after; "
                "use a smaller --window or give --step"
            )
        step = full[0]
    counts: dict[str, int] = defaultdict(int)
    for _, task, _ in rows:
        counts[task] += 1
    tasks = {}
    for task, values in series.items():
        at = _windowed(values, step, window)
        tasks[task] = {
            "gain": at["gain"], "before_mean": at["before_mean"], "after_mean": at["after_mean"],
            "n_before_steps": at["n_before_steps"], "n_after_steps": at["n_after_steps"],
            "n_rows": counts[task],
            "series": [{"step": _clean_step(s), "gain": g["gain"]}
                       for s in steps for g in [_windowed(values, s, window)] if g["gain"] is not None],
        }
    return {
        "schema_version": artifacts.SCHEMA_VERSION,
        "kind": "gains",
        "source": source,
        "window": window,
        "step": _clean_step(step),
        "formula": "gain_t(s) = mean(R_t over steps s+1..s+w) - mean(R_t over steps s-w..s-1)",
        "n_rows": len(rows),
        "steps": [_clean_step(steps[0]), _clean_step(steps[-1])],
        "tasks": tasks,
    }


def read_gains(path: Path, window: int | None, step: float | None) -> dict[str, Any]:
    """A gains document: a JSON written by `gradprobe gains --out`, or computed from a log."""
    path = Path(path)
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{path}: corrupt gains file ({exc})") from None
        if isinstance(document, dict) and document.get("kind") == "gains":
            if (window is not None and window != document["window"]) or (
                    step is not None and step != document["step"]):
                raise UserInputError(f"{path}: a saved gains file has window {document['window']} "
                                     f"and step {document['step']}; recompute from the log to change them")
            return document
    return log_gains(read_log(path), window or DEFAULT_WINDOW, step, str(path))


DEFAULT_WINDOW = 10
