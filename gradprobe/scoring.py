"""The scoring stage: rewards per completion, then advantages per prompt group."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from gradprobe.advantages import AdvantageEstimator
from gradprobe.errors import UserInputError
from gradprobe.rewards import RewardSpec
from gradprobe.rollouts import Rollout


def score_rollouts(
    rollouts: list[Rollout],
    rewards: Mapping[str, RewardSpec],
    on_item: Callable[[int], None] | None = None,
) -> list[Rollout]:
    """Each rollout with `reward` set by its task's reward function."""
    scored = []
    for rollout in rollouts:
        spec = rewards[rollout.task]
        value = spec(
            rollout.completion,
            rollout.answer,
            prompt=rollout.prompt,
            task=rollout.task,
            **rollout.extra,
        )
        if not np.isfinite(value):
            raise UserInputError(
                f"reward {spec.name!r} returned {value} for task {rollout.task!r}; rewards must be finite"
            )
        scored.append(replace(rollout, reward=float(value), reward_components={spec.name: float(value)}))
        if on_item is not None:
            on_item(1)
    return scored


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
