"""Scoring many completions, in this process or in worker processes (``--reward-workers N``).

Slow verifiers (math_verify, sandboxed tests) dominate the rewards stage; worker processes run
them side by side. Results come back in input order, so they equal the serial ones exactly.
Workers are started with ``spawn`` (forking a process that holds torch's threads can hang), and
each receives the task rewards once; reward functions must therefore be importable by name
(registered ones and ``package.module:function`` are).

Every reward call has a wall-clock limit (``--reward-timeout``), and a reward that raises,
returns a non-number or runs out of time stops the scan with one line naming the task and the
prompt. Workers ignore Ctrl-C and die with the scanning process: on Ctrl-C, SIGTERM or an error
the main process stops them (and they their sandboxes) before the exception goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.composite import CompositeReward

# One job: (task, prompt id, completion, answer as stored, context keyword arguments).
Job = tuple[str, str, str, Any, dict[str, Any]]
Score = tuple[float, dict[str, float]]
# Seconds a stopped worker gets to unwind (kill its sandbox, remove temporaries) before SIGKILL.
STOP_GRACE_S = 3.0

_worker_rewards: Mapping[str, CompositeReward] = {}
_worker_timeout_s: float = 0.0


class RewardTimeout(BaseException):
    """A reward call ran past its limit (a BaseException, so ``except Exception`` in a reward
    cannot swallow it)."""


def score_jobs(
    rewards: Mapping[str, CompositeReward],
    jobs: list[Job],
    workers: int = 1,
    on_item: Callable[[int], None] | None = None,
    timeout_s: float = 0.0,
) -> list[Score]:
    """The (total, components) score of every job, in order; `on_item(n)` after n are done.

    `timeout_s` (0: none) limits each reward call's wall-clock time where the scoring runs in
    a main thread (this process's, or a worker's).
    """
    if workers < 1:
        raise UserInputError("--reward-workers must be at least 1")
    advance = on_item or (lambda n: None)
    if workers == 1 or len(jobs) < 2:
        scores = []
        for job in jobs:
            scores.append(score_job(rewards, job, timeout_s))
            advance(1)
        return scores
    return _score_in_workers(rewards, jobs, workers, advance, timeout_s)


def score_job(rewards: Mapping[str, CompositeReward], job: Job, timeout_s: float = 0.0) -> Score:
    """One job's score; any failure of the reward becomes a `UserInputError` naming the task,
    the prompt and what went wrong."""
    task, prompt_id, completion, answer, context = job
    where = f"task {task!r}, prompt {prompt_id!r}"
    try:
        with deadline(timeout_s):
            return rewards[task].score(completion, answer, **context)
    except RewardTimeout:
        raise UserInputError(
            f"{where}: reward {rewards[task].name!r} ran longer than --reward-timeout "
            f"{timeout_s:g}s; raise the limit or fix the reward"
        ) from None
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise `RewardTimeout` in this (main) thread after `seconds` of wall-clock time.

    A timer thread sends SIGUSR1 to the main thread, which interrupts sleeps and waits too.
    SIGALRM is left to rewards (math_verify times itself with it). No limit off the main thread.
    """
    main = threading.main_thread()
    if not seconds or seconds <= 0 or threading.current_thread() is not main:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RewardTimeout()

    previous = signal.signal(signal.SIGUSR1, expire)
    timer = threading.Timer(seconds, signal.pthread_kill, (main.ident, signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


def _init_worker(rewards: Mapping[str, CompositeReward], timeout_s: float) -> None:
    global _worker_rewards, _worker_timeout_s
    _worker_rewards, _worker_timeout_s = rewards, timeout_s
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _die_with_parent()


class _WorkerStopped(BaseException):
    """SIGTERM from the main process: unwind the running reward (its sandbox is killed, its
    temporaries removed), then exit."""


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise _WorkerStopped()


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the scanning process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the main process stops workers on every way out it sees


def _score_chunk(jobs: list[Job]) -> list[Score]:
    try:
        return [score_job(_worker_rewards, job, _worker_timeout_s) for job in jobs]
    except _WorkerStopped:
        os._exit(128 + signal.SIGTERM)  # the pool would catch SystemExit and carry on


def _score_in_workers(
    rewards: Mapping[str, CompositeReward], jobs: list[Job], workers: int,
    advance: Callable[[int], None], timeout_s: float,
) -> list[Score]:
    size = max(1, min(64, len(jobs) // (workers * 4)))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context,
                               initializer=_init_worker, initargs=(rewards, timeout_s))
    try:
        futures = [pool.submit(_score_chunk, chunk) for chunk in chunks]
        results: list[Score] = []
        for future, chunk in zip(futures, chunks):
            results += future.result()
            advance(len(chunk))
    except UserInputError as exc:
        _stop(pool)
        raise UserInputError(str(exc)) from None  # without the worker's traceback
    except (pickle.PicklingError, AttributeError, BrokenProcessPool) as exc:
        _stop(pool)
        if isinstance(exc, AttributeError) and "pickle" not in str(exc):
            raise
        raise UserInputError(
            f"--reward-workers {workers}: a reward could not run in a worker process "
            f"({type(exc).__name__}: {_first_line(exc)}); define reward functions at module "
            "level of an importable module, or use --reward-workers 1"
        ) from None
    except BaseException:
        _stop(pool)  # Ctrl-C, SIGTERM, anything: no worker outlives the scan
        raise
    pool.shutdown()
    return results


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, SIGTERM the workers (they unwind), SIGKILL the slow ones."""
    pool.shutdown(wait=False, cancel_futures=True)
    # The pool's workers are this process's only multiprocessing children while it scores.
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(1.0)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
