"""Reward functions, registered by name; importing this package registers the built-in ones."""

from gradprobe.rewards import string_match  # noqa: F401  (registers exact, numeric, regex)
from gradprobe.rewards import answer_format, countdown, math_answer, python_tests  # noqa: F401
from gradprobe.rewards.composite import CompositeReward, build_composite, parse_composite
from gradprobe.rewards.registry import (
    REWARDS,
    RewardFn,
    RewardSpec,
    effective_rewards,
    parse_reward_options,
    register_reward,
    resolve_reward,
)

__all__ = [
    "CompositeReward",
    "build_composite",
    "parse_composite",
    "REWARDS",
    "RewardFn",
    "RewardSpec",
    "effective_rewards",
    "parse_reward_options",
    "register_reward",
    "resolve_reward",
]
