"""Reward functions, registered by name; importing this package registers the built-in ones."""

from gradprobe.rewards import string_match  # noqa: F401  (registers exact, numeric, regex)
from gradprobe.rewards import countdown, math_answer, python_tests  # noqa: F401  (register them)
from gradprobe.rewards.registry import (
    REWARDS,
    RewardFn,
    RewardSpec,
    parse_reward_options,
    register_reward,
    resolve_reward,
)

__all__ = [
    "REWARDS",
    "RewardFn",
    "RewardSpec",
    "parse_reward_options",
    "register_reward",
    "resolve_reward",
]
