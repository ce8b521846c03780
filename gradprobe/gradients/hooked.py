"""Per-unit gradients from one ordinary forward and backward per micro-batch, with module hooks.

The vmap engine (`gradients.engine`) differentiates every unit separately; this one runs the
model as a training step would, over micro-batches of whole units, with the selected parameters
frozen so autograd computes no weight gradient at all. For each module owning a selected
parameter a forward hook keeps the module's input, and a hook on its output receives the output
gradient in backward; the module's rule (`unit_rules`) turns the two into per-unit gradients,
which are reduced at once into

- the Gram matrix of every pair of units within a block (a task's units), per module group;
- the linear sums ``W @ grads`` (task gradients), whose dot products give the cross-block figures;

and freed, layer by layer. A block split over several micro-batches keeps its earlier units'
gradients until its last micro-batch (the retained bytes are planned; past the budget
`plan` raises `NeedsRecomputation` and the scan uses the vmap engine, which recomputes instead).

Tied weights (an embedding shared with the output layer) have one owner per use; their
contributions are added before any product. Results equal the vmap engine's to rounding and
float64 autograd's to 1e-6 (tests/test_gradients_hooked.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradprobe.gradients.engine import (
    NonFiniteGradientError,
    UnitBatch,
    UnitGradients,
    SelectedParameters,
    activation_bytes_per_token,
    halving_on_out_of_memory,
    pad_rows,
)
from gradprobe.gradients.unit_rules import MicroBatchUnits, PerUnit, Rule, add_weighted, gram, rule_for
from gradprobe.objective import token_logprobs


CPU_MAX_TOKENS = 4096


class NeedsRecomputation(RuntimeError):
    """The plan does not fit: a block's retained unit gradients would exceed the budget."""


class UnsupportedModel(RuntimeError):
    """A selected parameter's module cannot be handled by hooks (the reason is the message)."""


@dataclass
class _Owner:
    """A module that uses selected parameters, and how to get their per-unit gradients."""

    module: torch.nn.Module
    rule: Rule
    local_names: list[str]
    global_names: list[str]


@dataclass
class _BlockSlice:
    block: int
    start: int
    end: int
    """Local units [start, end) of the micro-batch."""
    positions: torch.Tensor
    """Their positions within the block."""
    continues: bool
    """Whether later micro-batches hold more of the block's units."""
    whole: bool
    """Whether these are all the block's units, in order (its Gram is then added as is)."""


class HookedEngine:
    """Gram matrices within blocks and linear sums of per-unit gradients, via module hooks."""

    def __init__(
        self,
        model: torch.nn.Module,
        param_names: list[str],
        temperature: float = 1.0,
        accumulate_dtype: torch.dtype = torch.float32,
        pad_token_id: int = 0,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.selected = SelectedParameters.of(model, param_names, accumulate_dtype)
        self.names, self.dtype, self.device = self.selected.names, self.selected.dtype, self.selected.device
        self.temperature = temperature
        self.pad_token_id = pad_token_id
        self.owners, self.n_uses = self._find_owners(dict(model.named_parameters()))

    def _find_owners(self, named: dict[str, torch.nn.Parameter]) -> tuple[list[_Owner], dict[str, int]]:
        by_id = {id(named[n]): n for n in self.names}
        owners, uses = [], dict.fromkeys(self.names, 0)
        for module_name, module in self.model.named_modules():
            local = [(k, by_id[id(p)]) for k, p in module._parameters.items() if p is not None and id(p) in by_id]
            if not local:
                continue
            rule = rule_for(module)
            if rule is None:
                raise UnsupportedModel(f"{module_name} ({type(module).__name__}) owns a selected "
                                       "parameter but has submodules")
            owners.append(_Owner(module, rule, [k for k, _ in local], [g for _, g in local]))
            for _, global_name in local:
                uses[global_name] += 1
        return owners, uses

    # ---- planning -------------------------------------------------------------------------
    def plan(self, batch: UnitBatch, blocks: list[list[int]], max_tokens: int,
             max_retained_bytes: int) -> list[list[int]]:
        """Micro-batches of active units, block by block, each at most `max_tokens` padded tokens
        and at most as many units as keep the largest layer's per-unit gradients within them."""
        element = torch.finfo(self.dtype).bits // 8
        largest = max(self.selected.size(n) for n in self.names)
        unit_cap = max(1, (max_tokens * activation_bytes_per_token(self.model) // 2) // max(1, 2 * largest * element))
        packer = _Packer(batch, max_tokens, unit_cap)
        for members in blocks:
            active = [u for u in members if batch.is_active(u)]
            if active and packer.fits_alone(active) and not packer.fits(active):
                packer.close()  # a block that fits whole in one micro-batch is not split
            for u in active:
                if not packer.fits([u]):
                    packer.close()
                packer.add(u)
        packer.close()
        micro_batches = packer.micro_batches
        self._check_retention(batch, blocks, micro_batches, max_retained_bytes, element)
        return micro_batches

    def _check_retention(self, batch: UnitBatch, blocks: list[list[int]], micro_batches: list[list[int]],
                         max_retained_bytes: int, element: int) -> None:
        where = {u: i for i, mb in enumerate(micro_batches) for u in mb}
        for b, members in enumerate(blocks):
            active = [u for u in members if u in where]
            if len({where[u] for u in active}) > 1:
                need = len(active) * self.selected.n_selected * element
                if need > max_retained_bytes:
                    raise NeedsRecomputation(
                        f"block {b} spans several micro-batches and would retain {need / 2**30:.1f} GiB "
                        f"of unit gradients (budget {max_retained_bytes / 2**30:.1f} GiB)")

    def default_max_tokens(self, max_memory: int) -> int:
        """Padded tokens per micro-batch so activations take about half of `max_memory`; on the
        CPU at most CPU_MAX_TOKENS, as larger micro-batches run slower there (benchmarks/RESULTS.md)."""
        tokens = max(1, (max_memory // 2) // activation_bytes_per_token(self.model))
        return tokens if self.device.type == "cuda" else min(tokens, CPU_MAX_TOKENS)

    # ---- running --------------------------------------------------------------------------
    def run_adaptive(self, batch: UnitBatch, blocks: list[list[int]], sum_weights: torch.Tensor,
                     max_tokens: int, max_retained_bytes: int,
                     on_chunk: Callable[[int], None] | None = None,
                     on_retry: Callable[[int], None] | None = None, keep_sums: bool = True) -> UnitGradients:
        """`run`, halving the micro-batch's tokens after an out-of-memory error, down to the
        longest sequence."""
        longest = max((len(s) for s in batch.sequences), default=1)
        return halving_on_out_of_memory(
            lambda tokens: self.run(batch, blocks, sum_weights, tokens, max_retained_bytes, on_chunk, keep_sums),
            max(max_tokens, longest), longest, self.device, on_retry)

    def run(
        self,
        batch: UnitBatch,
        blocks: list[list[int]],
        sum_weights: torch.Tensor,
        max_tokens: int = 1 << 14,
        max_retained_bytes: int = 2 << 30,
        on_chunk: Callable[[int], None] | None = None,
        keep_sums: bool = True,
    ) -> UnitGradients:
        """One forward and backward per micro-batch; `on_chunk(n_units)` after each."""
        micro_batches = self.plan(batch, blocks, max_tokens, max_retained_bytes)
        state = _RunState(self, blocks, sum_weights, micro_batches)
        handles = self._install(state)
        try:
            for index, units in enumerate(micro_batches):
                state.begin(batch, index)
                self._forward_backward(batch, units)
                state.end()
                if on_chunk is not None:
                    on_chunk(len(units))
        finally:
            for handle in handles:
                handle.remove()
        # A NaN or Inf anywhere in a unit's gradient reaches its squared norm, the Gram diagonal.
        nonfinite = [blocks[b][i] for b, g in enumerate(state.block_gram)
                     for i in (~torch.isfinite(g.diagonal(dim1=1, dim2=2)).all(0)).nonzero().flatten().tolist()]
        if nonfinite:
            raise NonFiniteGradientError(sorted(nonfinite))
        return self.selected.result(blocks, state.block_gram, state.sums, keep_sums, "hooks", 1,
                                    max((len(u) for u in micro_batches), default=0))

    def _forward_backward(self, batch: UnitBatch, units: list[int]) -> None:
        """sum_j coef_j log pi(x_j | x_<j) over the micro-batch's sequences, and its backward.

        Rows are right-padded, so causal attention never sees padding; only the logits that
        predict tokens with a coefficient are computed (`logits_to_keep`).
        """
        ids, coef, first = pad_rows(batch, [s for u in units for s in batch.units[u]], self.pad_token_id, self.dtype)
        ids, coef = ids.to(self.device), coef.to(self.device)
        length = ids.shape[-1]
        with torch.enable_grad():
            logits = self.model(ids, use_cache=False, logits_to_keep=length - first + 1).logits
            logp = token_logprobs(logits.to(self.dtype), ids[:, first - 1 :], self.temperature)
            loss = (coef[:, first:] * logp).sum()
            if loss.requires_grad:
                loss.backward()

    def _install(self, state: _RunState) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for owner in self.owners:
            module = owner.module
            handles.append(module.register_forward_pre_hook(functools.partial(state.before, owner),
                                                            with_kwargs=True))
            handles.append(module.register_forward_hook(functools.partial(state.after, owner)))
        return handles


class _Packer:
    """Greedy packing of units into micro-batches of at most `max_tokens` padded tokens."""

    def __init__(self, batch: UnitBatch, max_tokens: int, unit_cap: int) -> None:
        self.batch, self.max_tokens, self.unit_cap = batch, max_tokens, unit_cap
        self.micro_batches: list[list[int]] = []
        self.current: list[int] = []
        self.rows = self.length = 0

    def _shape(self, units: list[int]) -> tuple[int, int]:
        seqs = [s for u in units for s in self.batch.units[u]]
        return len(seqs), max(len(self.batch.sequences[s]) for s in seqs)

    def fits_alone(self, units: list[int]) -> bool:
        rows, length = self._shape(units)
        return len(units) <= self.unit_cap and rows * length <= self.max_tokens

    def fits(self, units: list[int]) -> bool:
        """Whether `units` fit in the open micro-batch (always, when it is empty)."""
        if not self.current:
            return True
        rows, length = self._shape(units)
        return (len(self.current) + len(units) <= self.unit_cap
                and (self.rows + rows) * max(self.length, length) <= self.max_tokens)

    def add(self, unit: int) -> None:
        rows, length = self._shape([unit])
        self.current.append(unit)
        self.rows, self.length = self.rows + rows, max(self.length, length)

    def close(self) -> None:
        if self.current:
            self.micro_batches.append(self.current)
        self.current, self.rows, self.length = [], 0, 0


class _BufferPool:
    """Per-unit output buffers reused across layers and micro-batches (fresh large allocations are
    page-faulted in on the CPU and cost as much as the matmul that fills them). Holds no reference
    to the run's state, so nothing keeps a finished run's memory alive."""

    def __init__(self, max_units: int) -> None:
        self.max_units = max_units
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lent: dict[int, tuple[tuple, torch.Tensor]] = {}

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [shape[0], ...] view of a pooled buffer, lent until `give_back`."""
        key = (tuple(shape[1:]), dtype, device)
        free = self.free.setdefault(key, [])
        base = free.pop() if free else torch.empty((self.max_units, *shape[1:]), dtype=dtype, device=device)
        self.lent[base.data_ptr()] = (key, base)
        return base[: shape[0]]

    def give_back(self, values: torch.Tensor) -> None:
        lent = self.lent.pop(values.data_ptr(), None)
        if lent is not None:
            self.free[lent[0]].append(lent[1])


class _RunState:
    """What one run accumulates, and the hooks' per-micro-batch bookkeeping."""

    def __init__(self, engine: HookedEngine, blocks: list[list[int]], sum_weights: torch.Tensor,
                 micro_batches: list[list[int]]) -> None:
        self.engine = engine
        self.blocks = blocks
        self.micro_batches = micro_batches
        device, dtype = engine.device, engine.dtype
        self.weights = sum_weights.to(device, dtype)
        self.sums = {n: torch.zeros((sum_weights.shape[0], *engine.selected.shapes[n]), dtype=dtype, device=device)
                     for n in engine.names}
        self.block_gram = [torch.zeros((len(engine.selected.groups), len(b), len(b)), dtype=torch.float64, device=device)
                           for b in blocks]
        self.unit_place = {u: (b, i) for b, members in enumerate(blocks) for i, u in enumerate(members)}
        last = {}
        for index, units in enumerate(micro_batches):
            for u in units:
                last[self.unit_place[u][0]] = index
        self.last_micro_batch = last
        self.retained: dict[str, dict[int, list[tuple[torch.Tensor, PerUnit]]]] = {}
        self.in_rule = False
        self.buffers = _BufferPool(max((len(units) for units in micro_batches), default=1))

    def begin(self, batch: UnitBatch, index: int) -> None:
        units = self.micro_batches[index]
        self.units = units
        row_unit, unit_rows, row = [], [], 0
        for local, u in enumerate(units):
            unit_rows.append((row, row + len(batch.units[u])))
            row_unit += [local] * len(batch.units[u])
            row += len(batch.units[u])
        self.layout = MicroBatchUnits(torch.tensor(row_unit, device=self.engine.device), unit_rows,
                                      self.buffers.allocate)
        self.slices: list[_BlockSlice] = []
        for b in dict.fromkeys(self.unit_place[u][0] for u in units):
            local = [i for i, u in enumerate(units) if self.unit_place[u][0] == b]
            positions = [self.unit_place[units[i]][1] for i in local]
            self.slices.append(_BlockSlice(b, local[0], local[-1] + 1,
                                           torch.tensor(positions, device=self.engine.device),
                                           self.last_micro_batch[b] > index,
                                           positions == list(range(len(self.blocks[b])))))
        self.inputs: dict[int, torch.Tensor] = {}
        self.pending: dict[str, PerUnit] = {}
        self.received = dict.fromkeys(self.engine.names, 0)
        self.unit_weights = self.weights[:, torch.tensor(units, device=self.engine.device)]
        # Sums this micro-batch touches (a task's row has no weight on other tasks' units).
        self.unit_rows_used = (self.unit_weights != 0).any(1).nonzero().flatten().tolist()

    def before(self, owner: _Owner, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: one tensor input, called once; make it a leaf that needs a gradient
        when nothing upstream does (autograd then stops there)."""
        if self.in_rule:  # the generic rule runs the module again
            return None
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise UnsupportedModel(f"{type(module).__name__} is called with other than one tensor")
        if id(module) in self.inputs:
            raise UnsupportedModel(f"{type(module).__name__} is called twice in one forward")
        x = args[0]
        if x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(True),), kwargs
        return None

    def after(self, owner: _Owner, module: torch.nn.Module, args: tuple, output):
        if self.in_rule:
            return None
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModel(f"{type(module).__name__} does not return one tensor")
        self.inputs[id(module)] = args[0].detach()
        replaced = None
        if not output.requires_grad:  # an embedding of integer ids with a frozen table
            output = replaced = output.detach().requires_grad_(True)
        output.register_hook(functools.partial(self.on_output_grad, owner))
        return replaced

    def on_output_grad(self, owner: _Owner, grad: torch.Tensor) -> None:
        x = self.inputs.pop(id(owner.module))
        self.in_rule = True
        try:
            parts = owner.rule(owner.module, owner.local_names, x, grad, self.layout, self.engine.dtype)
        finally:
            self.in_rule = False
        for local, name in zip(owner.local_names, owner.global_names):
            part = parts[local]
            self.pending[name] = part if name not in self.pending else \
                self.pending[name].plus(part, self.engine.selected.shapes[name])
            self.received[name] += 1
            if self.received[name] == self.engine.n_uses[name]:
                self.reduce(name, self.pending.pop(name))

    def end(self) -> None:
        """After backward: reduce what is still pending (a use whose output got no gradient)."""
        for name in list(self.pending):
            self.reduce(name, self.pending.pop(name))
        self.inputs.clear()
        for piece in self.slices:
            if not piece.continues:
                for kept in self.retained.values():
                    kept.pop(piece.block, None)

    def reduce(self, name: str, part: PerUnit) -> None:
        """Add a parameter's per-unit gradients to the block Grams and the sums, then drop them."""
        group = self.engine.selected.group_of[name]
        total, rows = self.sums[name], self.unit_rows_used
        if len(rows) == total.shape[0]:
            add_weighted(total, self.unit_weights, part)
        else:
            for r in rows:
                add_weighted(total[r : r + 1], self.unit_weights[r : r + 1], part)
        for piece in self.slices:
            mine = PerUnit(part.values[piece.start : piece.end], part.rows)
            inner = gram(mine, mine).to(torch.float64)
            target = self.block_gram[piece.block][group]
            p = piece.positions
            if piece.whole:
                target += inner
            else:
                target[p[:, None], p[None, :]] += inner
            for q, earlier in self.retained.get(name, {}).get(piece.block, []):
                cross = gram(mine, earlier).to(torch.float64)
                target[p[:, None], q[None, :]] += cross
                target[q[:, None], p[None, :]] += cross.T
            if piece.continues:
                kept = PerUnit(mine.values.clone(), mine.rows)
                self.retained.setdefault(name, {}).setdefault(piece.block, []).append((p, kept))
        self.buffers.give_back(part.values)
