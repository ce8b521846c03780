"""The policy-gradient objective: token log-probabilities and loss aggregations.

Definitions: docs/metrics.md, "Rollouts and losses". Every aggregation is linear in
the per-token losses l_ij = -A_i log pi(y_ij | ...), so a set S of completions has the loss

    L_S = sum_i c_i sum_j l_ij

with one coefficient c_i per completion. An aggregation therefore only says what c_i is, and
how much weight w_t a task's loss has in the mixed batch (L = sum_t w_t L_t).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradprobe.registry import Registry


@dataclass(frozen=True)
class Aggregation:
    """A loss aggregation: per-completion coefficients and mixed-batch task weights."""

    coefficients: Callable[[np.ndarray, int], np.ndarray]
    """(n_tokens of the set's completions, max_new_tokens) -> c_i per completion."""
    weight_by: str
    """'completions' or 'tokens': what a task's share of the mixed batch counts."""
    formula: str

    def mix_weights(self, n_completions: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
        """w_t: each task's share of the mixed batch's completions (or tokens)."""
        counts = np.asarray(n_tokens if self.weight_by == "tokens" else n_completions, float)
        return counts / counts.sum()


LOSSES: Registry[Aggregation] = Registry("loss aggregation")


def sequence_mean_of_token_means(n_tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """grpo: L_S = (1/N_S) sum_i (1/n_i) sum_j l_ij, so c_i = 1 / (N_S n_i)."""
    n = np.asarray(n_tokens, float)
    return 1.0 / (n.size * n)


def token_mean(n_tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """bnpo/dapo: L_S = sum_i sum_j l_ij / sum_i n_i, so c_i = 1 / sum_i n_i."""
    n = np.asarray(n_tokens, float)
    return np.full(n.size, 1.0 / n.sum())


def constant_length_mean(n_tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """dr_grpo: L_S = sum_i sum_j l_ij / (N_S L_max), so c_i = 1 / (N_S L_max)."""
    n = np.asarray(n_tokens, float)
    return np.full(n.size, 1.0 / (n.size * max_new_tokens))


def sequence_sum_mean(n_tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """rloo: L_S = (1/N_S) sum_i sum_j l_ij (TRL's RLOO: sequence log-probabilities), so c_i = 1 / N_S."""
    n = np.asarray(n_tokens, float)
    return np.full(n.size, 1.0 / n.size)


LOSSES.register("grpo")(
    Aggregation(sequence_mean_of_token_means, "completions", "(1/N) sum_i (1/n_i) sum_j l_ij")
)
_token_mean = Aggregation(token_mean, "tokens", "sum_i sum_j l_ij / sum_i n_i")
LOSSES.register("bnpo")(_token_mean)
LOSSES.register("dapo")(_token_mean)
LOSSES.register("dr_grpo")(
    Aggregation(constant_length_mean, "completions", "sum_i sum_j l_ij / (N L_max)")
)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(x_j | x_<j) for j >= 1 from logits / temperature; shape [..., L-1].

    The logit at position j-1 predicts token j, so position 0 (never a completion token) has none.
    """
    scaled = logits[..., :-1, :]
    if temperature != 1.0:  # a logits-sized copy otherwise: a few percent of the gradient stage
        scaled = scaled / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    return logp.gather(-1, input_ids[..., 1:, None]).squeeze(-1)
LOSSES.register("rloo")(Aggregation(sequence_sum_mean, "completions", "(1/N) sum_i sum_j l_ij"))
