"""Sampling split over ranks: each rank samples and scores whole generation batches, then all
ranks hold every rollout in the order one process would have made them.

Generation batch b is sampled from its own seed (`gradprobe.rollouts.batch_seed`), so which
process samples it does not change it: the rollouts equal the one-process rollouts for the same
seed and batch size (on the same kind of device).
"""

from __future__ import annotations

from collections.abc import Sequence

from gradprobe.distributed.session import Session
from gradprobe.rollouts import Rollout


def batch_rollout_counts(n_prompts: int, batch_size: int, group_size: int) -> list[int]:
    """Rollouts in each generation batch: group_size per prompt, batch_size prompts a batch."""
    return [min(batch_size, n_prompts - start) * group_size for start in range(0, n_prompts, batch_size)]


def split_by_batch(rollouts: Sequence[Rollout], batches: Sequence[int], counts: Sequence[int]) -> list[tuple[int, list[Rollout]]]:
    """This rank's rollouts (its `batches`, in order) cut into (batch, rollouts) pieces."""
    pieces, start = [], 0
    for b in batches:
        pieces.append((b, list(rollouts[start:start + counts[b]])))
        start += counts[b]
    if start != len(rollouts):
        raise ValueError(f"{len(rollouts)} rollouts for batches of {start}")
    return pieces


def gather_in_batch_order(session: Session, rollouts: list[Rollout], batches: Sequence[int],
                          counts: Sequence[int]) -> list[Rollout]:
    """Every rank's rollouts, batch 0 first, after all ranks agree their sampling and scoring
    succeeded."""
    session.agree("rollouts")
    gathered = session.all_gather_objects(split_by_batch(rollouts, batches, counts), "rollouts")
    pieces = sorted((p for share in gathered for p in share), key=lambda piece: piece[0])
    return [r for _, piece in pieces for r in piece]
