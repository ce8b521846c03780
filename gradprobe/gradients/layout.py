"""From scored rollouts to the engine's units, and back: which unit is which task, prompt, sign.

Each prompt p of task t gives two units, its completions with positive and with negative
advantage (zero-advantage completions have zero gradient). The token coefficients are chosen so
that the two units' gradients add up to the per-prompt contribution u_p of docs/metrics.md:

    g_t = grad L_t = (1/m) sum_p u_p,  u_p = m * grad(prompt p's part of L_t),

so a completion i of prompt p gets coefficient -A_i * c_i * m on each of its tokens' log pi,
where c_i is the loss aggregation's coefficient over the task's completions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from gradprobe.errors import UserInputError
from gradprobe.gradients.engine import Reductions, UnitBatch
from gradprobe.objective import Aggregation
from gradprobe.rollouts import Rollout
from gradprobe.scoring import group_indices

POSITIVE, NEGATIVE = 1, -1


@dataclass(frozen=True)
class UnitLayout:
    """Index maps between units, prompts and tasks, and the mixed-batch task weights."""

    tasks: list[str]
    prompt_keys: list[tuple[str, str]]
    prompt_task: np.ndarray
    unit_prompt: np.ndarray
    unit_sign: np.ndarray
    task_weights: np.ndarray
    prompt_rollouts: list[list[int]]

    @property
    def prompts_per_task(self) -> np.ndarray:
        return np.bincount(self.prompt_task, minlength=len(self.tasks))

    def prompt_matrix(self) -> torch.Tensor:
        """[P, U]: row p sums prompt p's units into u_p."""
        matrix = torch.zeros(len(self.prompt_keys), len(self.unit_prompt), dtype=torch.float64)
        matrix[torch.as_tensor(self.unit_prompt), torch.arange(len(self.unit_prompt))] = 1.0
        return matrix

    @property
    def unit_task(self) -> np.ndarray:
        return self.prompt_task[self.unit_prompt]

    def prompt_units(self) -> list[list[int]]:
        """Each prompt's units, positive then negative (`build_units` makes them in that order)."""
        return [np.flatnonzero(self.unit_prompt == p).tolist() for p in range(len(self.prompt_keys))]

    def reductions(self) -> Reductions:
        """What the engines compute for a scan: each prompt's Gram of its sign units; the sums
        g_t+ and g_t- (rows 2t and 2t+1, `sign_sum_rows`); each unit's dot with its task's g_t."""
        n_tasks = len(self.tasks)
        targets = torch.zeros((n_tasks, 2 * n_tasks), dtype=torch.float64)
        for t in range(n_tasks):
            targets[t, 2 * t] = targets[t, 2 * t + 1] = 1.0
        return Reductions(self.prompt_units(), self.sign_sum_matrix(), targets, self.unit_task.tolist())

    def sign_sum_matrix(self) -> torch.Tensor:
        """[2T, U]: rows 2t and 2t+1 give g_t+ and g_t- (1/m_t on the task's units of that sign)."""
        positive, negative = self.task_matrix(POSITIVE), self.task_matrix(NEGATIVE)
        return torch.stack([positive, negative], 1).reshape(2 * len(self.tasks), -1)

    def task_matrix(self, sign: int | None = None) -> torch.Tensor:
        """[T, U]: row t gives g_t = (1/m_t) sum_p u_p, or its part from one advantage sign."""
        m = self.prompts_per_task
        unit_task = self.prompt_task[self.unit_prompt]
        matrix = torch.zeros(len(self.tasks), len(self.unit_prompt), dtype=torch.float64)
        for u, t in enumerate(unit_task):
            if sign is None or self.unit_sign[u] == sign:
                matrix[t, u] = 1.0 / m[t]
        return matrix


def build_units(
    rollouts: list[Rollout],
    aggregation: Aggregation,
    max_new_tokens: int,
    mix_weights: Mapping[str, float] | None = None,
) -> tuple[UnitBatch, UnitLayout]:
    """The engine's input (sequences, coefficients, units) and the layout that names the units.

    `mix_weights` (a mix spec's ``mix_weight`` per task, default 1) scale each task's count of
    completions (or tokens) before the mixed-batch weights w_t are normalised.
    """
    groups = group_indices(rollouts)
    tasks = list(dict.fromkeys(task for task, _ in groups))
    keys = sorted(groups, key=lambda key: tasks.index(key[0]))  # stable: by task, then file order
    coefficient = np.zeros(len(rollouts))
    n_completions = np.zeros(len(tasks))
    n_tokens = np.zeros(len(tasks))
    for t, task in enumerate(tasks):
        members = [i for key in keys if key[0] == task for i in groups[key]]
        lengths = np.array([rollouts[i].n_tokens for i in members])
        if (lengths == 0).any():
            bad = rollouts[members[int(np.argmin(lengths))]]
            raise UserInputError(
                f"task {task!r}, prompt {bad.prompt_id!r}: a completion has no tokens; "
                "every completion needs at least its EOS token"
            )
        m = sum(1 for key in keys if key[0] == task)
        c = aggregation.coefficients(lengths, max_new_tokens)
        for i, ci in zip(members, c):
            coefficient[i] = -rollouts[i].advantage * ci * m
        n_completions[t], n_tokens[t] = len(members), lengths.sum()
    signs = np.sign([r.advantage for r in rollouts]).astype(int)
    token_coefficients = [[0.0] * len(r.prompt_token_ids) + [coefficient[i]] * r.n_tokens
                          for i, r in enumerate(rollouts)]
    weights = _scaled_weights(aggregation.mix_weights(n_completions, n_tokens), tasks, mix_weights)
    return _assemble(rollouts, groups, tasks, keys, token_coefficients, signs, weights)


def build_coefficient_units(
    rollouts: list[Rollout],
    token_coefficients: list[list[float]],
    task_weights: np.ndarray | None = None,
) -> tuple[UnitBatch, UnitLayout]:
    """Units from per-token coefficients c_ij = dL/dlog pi_ij given directly (`measure_tensors`).

    `token_coefficients[i]` runs over rollout i's prompt and completion tokens. Task t's
    gradient is g_t = (1/w_t) grad sum_{i in t} sum_j c_ij log pi_ij (w_t = `task_weights` in
    `tasks` order, default 1), so the mixed gradient sum_t w_t g_t is the gradient of the
    whole batch's sum (docs/metrics.md, "Coefficients given directly"). A sequence's unit is
    the sign of its net advantage A_i = -sum_j c_ij: positive when A_i >= 0, negative when
    A_i < 0; a sequence with no nonzero coefficient has no gradient and belongs to neither.
    """
    groups = group_indices(rollouts)
    tasks = list(dict.fromkeys(task for task, _ in groups))
    keys = sorted(groups, key=lambda key: tasks.index(key[0]))
    weights = np.ones(len(tasks)) if task_weights is None else np.asarray(task_weights, float)
    m = np.array([sum(1 for key in keys if key[0] == task) for task in tasks], float)
    # The layout's task matrix takes (1/m_t) sum_p u_p, so each coefficient carries m_t / w_t.
    scale = {task: m[t] / weights[t] for t, task in enumerate(tasks)}
    scaled, signs = [], []
    for r, coefficients in zip(rollouts, token_coefficients):
        scaled.append([c * scale[r.task] for c in coefficients])
        active = any(c != 0.0 for c in coefficients)
        signs.append(0 if not active else NEGATIVE if sum(coefficients) > 0 else POSITIVE)
    return _assemble(rollouts, groups, tasks, keys, scaled, np.array(signs), weights)


def _assemble(
    rollouts: list[Rollout],
    groups: dict[tuple[str, str], list[int]],
    tasks: list[str],
    keys: list[tuple[str, str]],
    token_coefficients: list[list[float]],
    signs: np.ndarray,
    task_weights: np.ndarray,
) -> tuple[UnitBatch, UnitLayout]:
    """Two units per prompt (its sequences of sign +1, then -1) and the layout naming them."""
    sequences, coefficients, units, unit_prompt, unit_sign = [], [], [], [], []
    for p, key in enumerate(keys):
        for sign in (POSITIVE, NEGATIVE):
            unit = []
            for i in groups[key]:
                if signs[i] != sign:
                    continue
                r = rollouts[i]
                unit.append(len(sequences))
                sequences.append(r.prompt_token_ids + r.completion_token_ids)
                coefficients.append(token_coefficients[i])
            units.append(unit)
            unit_prompt.append(p)
            unit_sign.append(sign)
    layout = UnitLayout(
        tasks=tasks,
        prompt_keys=keys,
        prompt_task=np.array([tasks.index(task) for task, _ in keys]),
        unit_prompt=np.array(unit_prompt),
        unit_sign=np.array(unit_sign),
        task_weights=np.asarray(task_weights, float),
        prompt_rollouts=[groups[key] for key in keys],
    )
    return UnitBatch(sequences, coefficients, units), layout


def _scaled_weights(
    weights: np.ndarray, tasks: list[str], mix_weights: Mapping[str, float] | None
) -> np.ndarray:
    """w_t proportional to mix_weight_t times the task's batch share, normalised to sum 1."""
    if not mix_weights:
        return weights
    scaled = weights * np.array([float(mix_weights.get(task, 1.0)) for task in tasks])
    return scaled / scaled.sum()
