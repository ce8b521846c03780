"""Data parallelism of the scan: which rank does which prompts, and how their reductions add up.

Every reduction of the gradient stage is a sum over prompts (docs/engine.md): a prompt's Gram
and its units' row dots involve that prompt alone, and a task's sign sums are
s_k = sum_p sum_{a in p} W[k, a] grad_a. So each rank runs the ordinary streaming engine on its
own whole prompts, leaving every other prompt's entries at zero, and the sum over ranks of the
partial reductions is the whole:

    G[g, p] = sum_r G_r[g, p]   (only p's owner adds anything),
    s_k     = sum_r s_k^(r),
    row_dots[g, a] = sum_r row_dots_r[g, a]   (pass 2, against the complete s_k).

The sums are made whole (all-reduced) before pass 2, which needs every task gradient complete;
or, sharded (`--shard sums|params`, `gradprobe.distributed.sharded`), each rank keeps 1/N of
them, filled by a reduce-scatter per micro-batch, with the ranks stepping in lockstep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gradprobe.distributed.session import Session
from gradprobe.gradients.engine import Reductions, SelectedParameters, StreamingReductions, UnitBatch


def assign_prompts(costs: Sequence[int], world: int) -> list[int]:
    """The rank of each prompt: prompts in decreasing cost (ties by index) each go to the rank
    with the least cost so far (ties to the lowest rank); deterministic, so every rank computes
    the same assignment, and tasks spread over the ranks as their prompts' costs do."""
    load = [0] * world
    owner = [0] * len(costs)
    for p in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[p] = rank
        load[rank] += costs[p]
    return owner


def prompt_costs(batch: UnitBatch, prompt_units: Sequence[Sequence[int]]) -> list[int]:
    """Tokens of each prompt's sequences (0 for a prompt whose units carry no loss: the engines
    skip it)."""
    costs = []
    for units in prompt_units:
        active = any(batch.is_active(u) for u in units)
        costs.append(sum(len(batch.sequences[s]) for u in units for s in batch.units[u]) if active else 0)
    return costs


def restrict_to_prompts(batch: UnitBatch, prompt_units: Sequence[Sequence[int]], mine: set[int]) -> UnitBatch:
    """The batch with zero loss on every prompt not in `mine`: the engines leave such prompts
    out, so their reductions stay zero on this rank."""
    silenced = {s for p, units in enumerate(prompt_units) if p not in mine for u in units for s in batch.units[u]}
    coefficients = [[0.0] * len(c) if s in silenced else c for s, c in enumerate(batch.coefficients)]
    return UnitBatch(batch.sequences, coefficients, batch.units)


def generation_batches(n_batches: int, session: Session) -> list[int]:
    """The generation batches this rank samples: b = rank, rank + world, ..."""
    return list(range(session.rank, n_batches, session.world))


@dataclass
class DataParallel:
    """The gradient stage's share for this rank, and the completion of its reductions.

    `sharded_sums`: the task sums kept sharded (reduce-scatter per step); `lockstep`: every rank
    runs as many forward and backward passes as the busiest (needed by sharded sums and by
    FSDP2's gathers; plain replicated ranks each run their own)."""

    session: Session
    sharded_sums: bool = False
    lockstep: bool = False
    _full: UnitBatch | None = field(default=None, repr=False)
    _prompts: Sequence[Sequence[int]] = field(default=(), repr=False)
    _owner: list[int] = field(default_factory=list, repr=False)
    _plans: list[list[list[int] | None]] = field(default_factory=list, repr=False)

    def local_batch(self, batch: UnitBatch, prompt_units: Sequence[Sequence[int]]) -> UnitBatch:
        self._full, self._prompts = batch, prompt_units
        self._owner = assign_prompts(prompt_costs(batch, prompt_units), self.session.world)
        return self.batch_of(self.session.rank)

    def batch_of(self, rank: int) -> UnitBatch:
        """Rank `rank`'s batch: the prompts it owns carry their loss, the others none."""
        assert self._full is not None, "local_batch first"
        return restrict_to_prompts(self._full, self._prompts, {p for p, r in enumerate(self._owner) if r == rank})

    def schedule(self, plan: Callable[[UnitBatch], list[list[int]]]) -> list[list[int] | None]:
        """This rank's micro-batches; in lockstep, padded with empty steps (None) to the busiest
        rank's count, every rank's plan kept for `new_reductions`."""
        if not self.lockstep:
            return list(plan(self.batch_of(self.session.rank)))
        plans = [plan(self.batch_of(r)) for r in range(self.session.world)]
        steps = max(len(p) for p in plans)
        self._plans = [[p[s] if s < len(p) else None for s in range(steps)] for p in plans]
        return self._plans[self.session.rank]

    def new_reductions(self, selected: SelectedParameters, reductions: Reductions,
                       sums_device: torch.device | None, sketch_dim: int | None) -> StreamingReductions:
        if not self.sharded_sums:
            return StreamingReductions(selected, reductions, sums_device, sketch_dim, completion=self)
        from gradprobe.distributed.sharded import ShardedReductions, step_needs

        sums, targets = step_needs(self._plans, reductions)
        return ShardedReductions(selected, reductions, self.session, sums, targets, sums_device, sketch_dim,
                                 completion=self)

    def complete_sums(self, totals: StreamingReductions) -> None:
        """All-reduce the prompt Grams, every parameter's sums (unless sharded: complete already)
        and the unit sketches."""
        self.session.agree("gradients pass 1")
        self.session.all_reduce_sum(totals.prompt_gram, "prompt_gram")
        if not self.sharded_sums:
            for value in totals.sums.values():
                self.session.all_reduce_sum(value, "sums")
        if totals.sketch_dim is not None:
            self.session.all_reduce_sum(totals.unit_sketch, "unit_sketch")

    def complete_row_dots(self, totals: StreamingReductions) -> None:
        self.session.agree("gradients pass 2")
        self.session.all_reduce_sum(totals.row_dots, "row_dots")
