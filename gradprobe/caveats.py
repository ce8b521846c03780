"""Caveats of a scan: what limits its reading, each with its true cause.

Computed once from the document's numbers and saved in scan.json (`caveats`), so the console,
markdown, HTML and JSON say the same. Each is {"code", "tasks", "message"}.
"""

from __future__ import annotations

from typing import Any

# One prompt holding more than this share of a task's summed squared per-prompt norms carries
# the task's norm: the task's figures then describe that prompt more than the task.
ONE_PROMPT_SHARE = 0.5


def scan_caveats(tasks: dict[str, dict[str, Any]], prompts: list[dict[str, Any]],
                 stats: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The caveats of a scan's per-task figures and per-prompt rows. A prompt that carries its
    task's norm is left to the statistics when their dominance test flags such prompts itself."""
    caveats = _no_signal(tasks, prompts) + _below_noise(tasks, prompts)
    if "single_prompt" not in ((stats or {}).get("dominance") or {}):
        caveats += _one_prompt(prompts)
    return caveats


def _rewards_of(task: str, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in prompts if row["task"] == task]


def _no_signal(tasks: dict[str, dict[str, Any]], prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks whose every group has equal rewards: group-relative advantages are all 0."""
    silent = [t for t, row in tasks.items() if row.get("degenerate_fraction") == 1]
    if not silent:
        return []
    values = ", ".join(f"{t} {tasks[t]['mean_reward']:.3g}" for t in silent
                       if tasks[t]["mean_reward"] is not None)  # None: measured without rewards
    where = f" (mean reward {values})" if values else ""
    return [{"code": "no_reward_signal", "tasks": silent, "message": (
        f"No reward signal in {', '.join(silent)}: in every prompt group all rewards are equal"
        f"{where}, so every advantage and the gradient are zero. Check the "
        "task's reward (--reward) and answers, or sample more (--group-size, --temperature).")}]


def _below_noise(tasks: dict[str, dict[str, Any]], prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks with signal whose unbiased squared norm is <= 0: too few prompts to see it."""
    weak = [t for t, row in tasks.items() if row.get("degenerate_fraction", 0) < 1
            and row.get("grad_sq_norm_unbiased") is not None and row["grad_sq_norm_unbiased"] <= 0]
    if not weak:
        return []
    counts = ", ".join(f"{t} {tasks[t]['n_prompts']}" for t in weak)
    return [{"code": "signal_below_noise", "tasks": weak, "message": (
        f"Unbiased squared norm U <= 0 for {', '.join(weak)}: the gradient's direction is below "
        f"the noise of the prompts scanned ({counts}); its grad_norm is mostly noise. Scan more "
        "prompts (--prompts-per-task).")}]


def _one_prompt(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks where one prompt holds most of the summed squared per-prompt norms."""
    caveats = []
    for task in dict.fromkeys(row["task"] for row in prompts):
        squares = {row["prompt_id"]: row["prompt_grad_norm"] ** 2 for row in _rewards_of(task, prompts)}
        total = sum(squares.values())
        if total <= 0 or len(squares) < 2:
            continue
        top = max(squares, key=squares.get)
        if squares[top] / total > ONE_PROMPT_SHARE:
            caveats.append({"code": "one_prompt_carries_norm", "tasks": [task], "message": (
                f"One prompt carries {task}'s norm: {top} holds {squares[top] / total:.0%} of the "
                "task's summed squared per-prompt norms, so the task's figures describe that "
                "prompt more than the task. Look at it in rollouts.jsonl, or scan more prompts.")})
    return caveats
