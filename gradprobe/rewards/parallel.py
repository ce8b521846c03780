"""Scoring many completions, in this process or in worker processes (``--reward-workers N``).

Slow verifiers (math_verify, sandboxed tests) dominate the rewards stage; worker processes run
them side by side. Results come back in input order, so they equal the serial ones exactly.
Workers are started with ``spawn`` (forking a process that holds torch's threads can hang), and
each receives the task rewards once; reward functions must therefore be importable by name
(registered ones and ``package.module:function`` are).
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.composite import CompositeReward

# One job: (task, completion, answer, context keyword arguments).
Job = tuple[str, str, Any, dict[str, Any]]
Score = tuple[float, dict[str, float]]

_worker_rewards: Mapping[str, CompositeReward] = {}


def score_jobs(
    rewards: Mapping[str, CompositeReward],
    jobs: list[Job],
    workers: int = 1,
    on_item: Callable[[int], None] | None = None,
) -> list[Score]:
    """The (total, components) score of every job, in order; `on_item(n)` after n are done."""
    if workers < 1:
        raise UserInputError("--reward-workers must be at least 1")
    advance = on_item or (lambda n: None)
    if workers == 1 or len(jobs) < 2:
        scores = []
        for job in jobs:
            scores.append(_score(rewards, job))
            advance(1)
        return scores
    return _score_in_workers(rewards, jobs, workers, advance)


def _score(rewards: Mapping[str, CompositeReward], job: Job) -> Score:
    task, completion, answer, context = job
    return rewards[task].score(completion, answer, **context)


def _init_worker(rewards: Mapping[str, CompositeReward]) -> None:
    global _worker_rewards
    _worker_rewards = rewards


def _score_chunk(jobs: list[Job]) -> list[Score]:
    return [_score(_worker_rewards, job) for job in jobs]


def _score_in_workers(
    rewards: Mapping[str, CompositeReward], jobs: list[Job], workers: int,
    advance: Callable[[int], None],
) -> list[Score]:
    size = max(1, min(64, len(jobs) // (workers * 4)))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context,
                             initializer=_init_worker, initargs=(rewards,)) as pool:
        try:
            futures = [pool.submit(_score_chunk, chunk) for chunk in chunks]
            results: list[Score] = []
            for future, chunk in zip(futures, chunks):
                results += future.result()
                advance(len(chunk))
        except (pickle.PicklingError, AttributeError, BrokenProcessPool) as exc:
            if isinstance(exc, AttributeError) and "pickle" not in str(exc):
                raise
            raise UserInputError(
                f"--reward-workers {workers}: a reward could not run in a worker process "
                f"({type(exc).__name__}: {_first_line(exc)}); define reward functions at module "
                "level of an importable module, or use --reward-workers 1"
            ) from None
    return results


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
