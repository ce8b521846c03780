"""Advantage estimators, one per name, applied to the K rewards of one prompt group.

Definitions: docs/metrics.md, "Rollouts and losses". Register a new estimator with
``@ADVANTAGES.register("name")`` on an `AdvantageEstimator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradprobe.errors import UserInputError
from gradprobe.registry import Registry

GRPO_EPS = 1e-4  # TRL's GRPO epsilon; verl uses 1e-6. Reported with every scan.


@dataclass(frozen=True)
class AdvantageEstimator:
    """Maps a group's rewards to advantages; `needs_group` is true when K >= 2 is required."""

    fn: Callable[[np.ndarray], np.ndarray]
    needs_group: bool
    convention: str

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if self.needs_group and rewards.size < 2:
            raise UserInputError(
                "this advantage estimator needs groups of at least 2 completions per prompt: "
                "raise --group-size, or use --advantage none"
            )
        return self.fn(rewards)


ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage estimator")


def grpo_advantages(rewards: np.ndarray) -> np.ndarray:
    """A_k = (r_k - mean(r)) / (std(r) + eps), std with Bessel's correction (ddof=1), as TRL."""
    return (rewards - rewards.mean()) / (rewards.std(ddof=1) + GRPO_EPS)


def dr_grpo_advantages(rewards: np.ndarray) -> np.ndarray:
    """A_k = r_k - mean(r): Dr. GRPO drops the std scaling."""
    return rewards - rewards.mean()


def rloo_advantages(rewards: np.ndarray) -> np.ndarray:
    """A_k = r_k - mean of the other K-1 rewards = K/(K-1) (r_k - mean(r))."""
    k = rewards.size
    return (rewards - (rewards.sum() - rewards) / (k - 1)).astype(np.float64)


def no_baseline(rewards: np.ndarray) -> np.ndarray:
    """A_k = r_k: plain REINFORCE without a baseline."""
    return rewards.copy()


ADVANTAGES.register("grpo")(
    AdvantageEstimator(grpo_advantages, True, f"(r - mean) / (std + {GRPO_EPS:g}), std with ddof=1")
)
ADVANTAGES.register("dr_grpo")(AdvantageEstimator(dr_grpo_advantages, True, "r - mean"))
ADVANTAGES.register("rloo")(AdvantageEstimator(rloo_advantages, True, "r - mean of the other K-1"))
ADVANTAGES.register("none")(AdvantageEstimator(no_baseline, False, "r (no baseline)"))
