"""The scoring stage: rewards per completion, then advantages per prompt group."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from gradprobe.advantages import AdvantageEstimator
from gradprobe.errors import UserInputError
from gradprobe.rewards import RewardSpec
from gradprobe.rewards.composite import CompositeReward, as_composite
from gradprobe.rewards.parallel import score_jobs
from gradprobe.rollouts import Rollout


def score_rollouts(
    rollouts: list[Rollout],
    rewards: Mapping[str, RewardSpec | CompositeReward],
    on_item: Callable[[int], None] | None = None,
    workers: int = 1,
    timeout_s: float = 0.0,
) -> list[Rollout]:
    """Each rollout with `reward` (the task reward's weighted total) and `reward_components`.

    Reward functions get ``prompt``, ``task`` and the row's extra columns as keyword arguments,
    each as its convention takes them (`gradprobe.rewards.signatures`). With `workers` > 1 they
    run in that many worker processes; the results are the same. `timeout_s` (0: none) limits
    each reward call; a reward that fails, returns a non-number or runs out of time is a
    `UserInputError` naming the task and prompt.
    """
    composites = {task: as_composite(reward) for task, reward in rewards.items()}
    jobs = [(r.task, r.prompt_id, r.completion, r.answer,
             {**_context_columns(r.extra), "prompt": r.prompt, "task": r.task, "chat_prompt": r.chat_prompt})
            for r in rollouts]
    scores = score_jobs(composites, jobs, workers, on_item, timeout_s)
    return [replace(r, reward=total, reward_components=components)
            for r, (total, components) in zip(rollouts, scores)]


def _context_columns(extra: Mapping[str, object]) -> dict[str, object]:
    # The positional arguments' names cannot also come as keywords; chat_prompt is gradprobe's.
    return {k: v for k, v in extra.items() if k not in ("completion", "answer", "chat_prompt")}


def group_indices(rollouts: list[Rollout]) -> dict[tuple[str, str], list[int]]:
    """Indices of each prompt group's rollouts, keyed by (task, prompt_id), in first-seen order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, rollout in enumerate(rollouts):
        groups.setdefault((rollout.task, rollout.prompt_id), []).append(i)
    return groups


def assign_advantages(rollouts: list[Rollout], estimator: AdvantageEstimator) -> list[Rollout]:
    """Each rollout with `advantage` computed from its prompt group's rewards."""
    out = list(rollouts)
    for (task, prompt_id), members in group_indices(rollouts).items():
        rewards = np.array([rollouts[i].reward for i in members], dtype=np.float64)
        if estimator.needs_group and len(members) < 2:
            raise UserInputError(
                f"prompt {prompt_id!r} of task {task!r} has 1 completion, but this advantage "
                "estimator needs groups: use --group-size 2 or more, or --advantage none"
            )
        for i, advantage in zip(members, estimator(rewards)):
            out[i] = replace(rollouts[i], advantage=float(advantage))
    return out
