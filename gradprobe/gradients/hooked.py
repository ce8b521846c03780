"""The streaming engine: one ordinary forward and backward per micro-batch, with module hooks.

The model runs as a training step would, over micro-batches of whole prompts, with the selected
parameters frozen so autograd computes no weight gradient at all. For each module owning a
selected parameter a forward hook keeps the module's input, and a hook on its output receives
the output gradient in backward; the module's rule (`unit_rules`) turns the two into per-unit
gradients, a few prompts at a time, which `StreamingReductions` adds at once into

- each prompt's Gram of its units (its per-prompt squared norms and sign parts), per group;
- the sign sums of every task (float32, on the device or in host memory);

and frees, layer by layer. Nothing per unit outlives its layer, so memory is flat in the number
of prompts. With row dots asked for (exact intervals), a second pass of the same shape takes each
unit's inner product with its task gradient, now complete (docs/engine.md).

Tied weights (an embedding shared with the output layer) have one owner per use. Each use is
reduced as it comes; the Gram of the sum needs the cross terms between uses, so the first use
keeps its per-unit gradients restricted to the rows the other, sparse use can touch (the
micro-batch's token ids) until the second arrives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from gradprobe.gradients.engine import (
    PassCompletion,
    Reductions,
    SelectedParameters,
    StreamingReductions,
    UnitBatch,
    UnitGradients,
    checkpointed_layers,
    halving_on_out_of_memory,
    pad_rows,
)
from gradprobe.gradients.unit_rules import (
    MicroBatchUnits,
    PerUnit,
    Rule,
    embedding_rule,
    ghost_is_cheaper,
    linear_ghost_grams,
    linear_segment_sums,
    restricted,
    row_dot_rule_for,
    rule_for,
)
from gradprobe.objective import token_logprobs

DEFAULT_WORK_BYTES = 1 << 30
"""Per-unit gradients of one parameter in flight at once (a few prompts' worth of the largest
layer); the rest of a micro-batch's units wait their turn within the same hook."""


class UnsupportedModel(RuntimeError):
    """A selected parameter's module cannot be handled by hooks (the reason is the message)."""


@dataclass
class _Owner:
    """A module that uses selected parameters, and how to get their per-unit gradients."""

    module: torch.nn.Module
    rule: Rule
    local_names: list[str]
    global_names: list[str]


class HookedEngine:
    """Streaming prompt Grams, sign sums and row dots of per-unit gradients, via module hooks."""

    def __init__(
        self,
        model: torch.nn.Module,
        param_names: list[str],
        temperature: float = 1.0,
        accumulate_dtype: torch.dtype = torch.float32,
        pad_token_id: int = 0,
        sums_device: torch.device | str | None = None,
        work_bytes: int = DEFAULT_WORK_BYTES,
        sketch_dim: int | None = None,
        linear_norms: str = "auto",
        completion: PassCompletion | None = None,
        row_dot_rules: bool = True,
        checkpoint_activations: bool = False,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.completion = completion
        self.selected = SelectedParameters.of(model, param_names, accumulate_dtype)
        self.names, self.dtype, self.device = self.selected.names, self.selected.dtype, self.selected.device
        self.temperature = temperature
        self.pad_token_id = pad_token_id
        self.sums_device = sums_device
        self.work_bytes = work_bytes
        self.sketch_dim = sketch_dim
        self.linear_norms = linear_norms
        """Linear layers' per-unit norms: "ghost", "direct", or "auto" (the cheaper, per layer)."""
        self.row_dot_rules = row_dot_rules
        self.checkpoint_activations = checkpoint_activations
        """Decoder layers keep only their inputs and are recomputed in backward; the hooks take
        each module's input from the recomputation (docs/engine.md)."""
        """Pass 2 by registered row-dot rules where a module type has one (no per-unit
        gradients); False builds every unit's gradient and takes inner products (a reference)."""
        self.owners, self.n_uses = self._find_owners(dict(model.named_parameters()))
        self.sparse_names = {n for o in self.owners if o.rule is embedding_rule for n in o.global_names}

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
    def plan(self, batch: UnitBatch, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Micro-batches of whole prompts (indices into `prompts`), in order, each at most
        `max_tokens` padded tokens unless one prompt alone is larger; prompts whose units carry
        no loss (degenerate groups) are left out."""
        micro_batches: list[list[int]] = []
        current: list[int] = []
        rows = length = 0
        for p, units in enumerate(prompts):
            if not any(batch.is_active(u) for u in units):
                continue
            sequences = [s for u in units for s in batch.units[u]]
            p_rows, p_length = len(sequences), max(len(batch.sequences[s]) for s in sequences)
            if current and (rows + p_rows) * max(length, p_length) > max_tokens:
                micro_batches.append(current)
                current, rows, length = [], 0, 0
            current.append(p)
            rows, length = rows + p_rows, max(length, p_length)
        if current:
            micro_batches.append(current)
        return micro_batches

    # ---- running --------------------------------------------------------------------------
    def run_adaptive(self, batch: UnitBatch, reductions: Reductions, max_tokens: int,
                     on_chunk: Callable[[int], None] | None = None,
                     on_retry: Callable[[int], None] | None = None, keep_sums: bool = True,
                     row_dots: bool = True) -> UnitGradients:
        """`run`, halving the micro-batch's tokens after an out-of-memory error, down to the
        longest sequence."""
        longest = max((len(s) for s in batch.sequences), default=1)
        return halving_on_out_of_memory(
            lambda tokens: self.run(batch, reductions, tokens, on_chunk, keep_sums, row_dots),
            max(max_tokens, longest), longest, self.device, on_retry)

    def run(self, batch: UnitBatch, reductions: Reductions, max_tokens: int = 1 << 14,
            on_chunk: Callable[[int], None] | None = None, keep_sums: bool = True,
            row_dots: bool = True) -> UnitGradients:
        """Pass 1 (prompt Grams and sums), then with `row_dots` pass 2; `on_chunk(n_units)` after
        each micro-batch of each pass."""
        def plan(local: UnitBatch) -> list[list[int]]:
            return self.plan(local, reductions.prompts, max_tokens)

        if self.completion is None:
            steps: list[list[int] | None] = list(plan(batch))
            totals = StreamingReductions(self.selected, reductions, self.sums_device, self.sketch_dim)
        else:
            steps = self.completion.schedule(plan)
            totals = self.completion.new_reductions(self.selected, reductions, self.sums_device, self.sketch_dim)
        passes = ["sums", "row_dots"] if row_dots else ["sums"]
        for mode in passes:
            state = _PassState(self, totals, mode)
            handles = self._install(state)
            checkpointed = (checkpointed_layers(self.model, state.checkpoint_contexts)
                            if self.checkpoint_activations else nullcontext())
            try:
                with checkpointed:
                    for step, prompt_ids in enumerate(steps):
                        totals.begin_step(step)
                        if prompt_ids is None:  # nothing of ours: an empty step, in lockstep with the others
                            state.begin_idle()
                            self._idle_forward_backward()
                            state.end()
                            continue
                        state.begin(batch, prompt_ids)
                        self._forward_backward(batch, state.units)
                        state.end()
                        if on_chunk is not None:
                            on_chunk(len(state.units))
            finally:
                for handle in handles:
                    handle.remove()
            totals.end_pass_one() if mode == "sums" else totals.end_pass_two()
        largest = max((len(p) * reductions.units_per_prompt for p in steps if p is not None), default=0)
        return totals.result(keep_sums, row_dots, "hooks", len(passes), largest)

    def _forward_backward(self, batch: UnitBatch, units: list[int]) -> None:
        """sum_j coef_j log pi(x_j | x_<j) over the micro-batch's sequences, and its backward.

        Rows are right-padded, so causal attention never sees padding; only the logits that
        predict tokens with a coefficient are computed (`logits_to_keep`).
        """
        ids, coef, first = pad_rows(batch, [s for u in units for s in batch.units[u]], self.pad_token_id, self.dtype)
        ids, coef = ids.to(self.device), coef.to(self.device)
        length = ids.shape[-1]
        # Recompute each checkpointed layer whole: the hooks need every module's input, also of
        # modules after the layer's last saved tensor.
        with torch.enable_grad(), torch.utils.checkpoint.set_checkpoint_early_stop(False):
            logits = self.model(ids, use_cache=False, logits_to_keep=length - first + 1).logits
            logp = token_logprobs(logits.to(self.dtype), ids[:, first - 1 :], self.temperature)
            loss = (coef[:, first:] * logp).sum()
            if loss.requires_grad:
                loss.backward()

    def _idle_forward_backward(self) -> None:
        """A forward and backward of two padding tokens with zero loss: every hook and FSDP2's
        gathers run as in a real step, and nothing is added."""
        ids = torch.full((1, 2), self.pad_token_id, dtype=torch.long, device=self.device)
        with torch.enable_grad():
            logits = self.model(ids, use_cache=False, logits_to_keep=1).logits
            loss = (logits.to(self.dtype) * 0).sum()
            if loss.requires_grad:
                loss.backward()

    def _install(self, state: _PassState) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for owner in self.owners:
            module = owner.module
            handles.append(module.register_forward_pre_hook(functools.partial(state.before, owner),
                                                            with_kwargs=True))
            handles.append(module.register_forward_hook(functools.partial(state.after, owner)))
        return handles


class _BufferPool:
    """Per-unit output buffers reused across layers and micro-batches (fresh large allocations are
    page-faulted in on the CPU and cost as much as the matmul that fills them). Holds no reference
    to the run's state, so nothing keeps a finished run's memory alive."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.lent: dict[int, tuple[tuple, torch.Tensor]] = {}

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [shape[0], ...] view of a pooled buffer, lent until `give_back`."""
        key = (tuple(shape[1:]), dtype, device)
        free = self.free.setdefault(key, [])
        # By position: list.remove would compare tensors with ==, elementwise.
        fitting = next((i for i, b in enumerate(free) if b.shape[0] >= shape[0]), None)
        if fitting is not None:
            base = free.pop(fitting)
        else:
            base = torch.empty(shape, dtype=dtype, device=device)
        self.lent[base.data_ptr()] = (key, base)
        return base[: shape[0]]

    def give_back(self, values: torch.Tensor) -> None:
        lent = self.lent.pop(values.data_ptr(), None)
        if lent is not None:
            self.free[lent[0]].append(lent[1])


class _PassState:
    """One pass over the micro-batches: the hooks' bookkeeping, feeding `StreamingReductions`.

    mode "sums": prompt Grams and sums; mode "row_dots": each unit against its task gradient.
    """

    def __init__(self, engine: HookedEngine, totals: StreamingReductions, mode: str) -> None:
        self.engine, self.totals, self.mode = engine, totals, mode
        self.k = totals.k
        self.in_rule = False
        self.phase = "plain"
        """"plain", or inside a checkpointed layer its "forward" (inputs not kept) or its
        "recompute" (in backward: inputs kept, no gradient hooks)."""
        self.buffers = _BufferPool()
        selected = engine.selected
        element = torch.finfo(engine.dtype).bits // 8
        self.unit_bytes = {n: selected.size(n) * element for n in selected.names}

    def begin(self, batch: UnitBatch, prompt_ids: list[int]) -> None:
        self.idle = False
        self.prompt_ids = prompt_ids
        self.units = [u for p in prompt_ids for u in self.totals.reductions.prompts[p]]
        self.unit_rows, self.row_unit, row = [], [], 0
        for local, u in enumerate(self.units):
            self.unit_rows.append((row, row + len(batch.units[u])))
            self.row_unit += [local] * len(batch.units[u])
            row += len(batch.units[u])
        sequences = [batch.sequences[s] for u in self.units for s in batch.units[u]]
        length = max(len(s) for s in sequences)
        self.prompt_tokens = length * max(sum(len(batch.units[u]) for u in self.totals.reductions.prompts[p])
                                          for p in prompt_ids)
        self.token_rows = torch.unique(torch.tensor([t for s in sequences for t in s], device=self.engine.device))
        self.inputs: dict[int, torch.Tensor] = {}
        self.waiting: dict[int, torch.Tensor] = {}
        """Output gradients that arrived before their checkpointed module was recomputed."""
        self.called: set[int] = set()
        self.kept: dict[str, list[tuple[int, PerUnit]]] = {}
        self.received = dict.fromkeys(self.engine.names, 0)

    def checkpoint_contexts(self) -> tuple[object, object]:
        """torch.utils.checkpoint's context_fn: the phases of a checkpointed layer."""
        return self._in_phase("forward"), self._in_phase("recompute")

    @contextmanager
    def _in_phase(self, phase: str) -> Iterator[None]:
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def begin_idle(self) -> None:
        """An empty step: hooks only meet the other processes' collectives."""
        self.idle = True
        self.prompt_ids, self.units = [], []
        self.inputs, self.kept, self.waiting, self.called = {}, {}, {}, set()

    def before(self, owner: _Owner, module: torch.nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: one tensor input, called once (a recomputation aside); make it a
        leaf that needs a gradient when nothing upstream does (autograd then stops there)."""
        if self.in_rule:  # the generic rule runs the module again
            return None
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise UnsupportedModel(f"{type(module).__name__} is called with other than one tensor")
        if self.phase != "recompute":
            if id(module) in self.called:
                raise UnsupportedModel(f"{type(module).__name__} is called twice in one forward")
            self.called.add(id(module))
        x = args[0]
        if x.is_floating_point() and not x.requires_grad:
            return (x.detach().requires_grad_(True),), kwargs
        return None

    def after(self, owner: _Owner, module: torch.nn.Module, args: tuple, output):
        if self.in_rule:
            return None
        if not isinstance(output, torch.Tensor):
            raise UnsupportedModel(f"{type(module).__name__} does not return one tensor")
        replaced = None
        if not output.requires_grad:  # an embedding of integer ids with a frozen table
            output = replaced = output.detach().requires_grad_(True)
        if self.phase == "recompute":  # the original output's hook receives the gradient
            self._input_arrived(owner, args[0].detach())
            return replaced
        if self.phase == "plain":  # a checkpointed layer's inputs come with its recomputation
            self.inputs[id(module)] = args[0].detach()
        output.register_hook(functools.partial(self.on_output_grad, owner))
        return replaced

    def _input_arrived(self, owner: _Owner, x: torch.Tensor) -> None:
        """A recomputed input: reduce now if its output gradient came first, else keep it.
        The reduction runs outside the recomputation's saved-tensor hooks, which would take
        any tensor a rule saves for the layer's."""
        grad = self.waiting.pop(id(owner.module), None)
        if grad is None:
            self.inputs[id(owner.module)] = x
            return
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            self._reduce_module(owner, x, grad)

    def _chunks(self, owner: _Owner) -> list[tuple[int, int]]:
        """Local prompt ranges whose per-unit gradients of this owner fit `work_bytes` at once."""
        per_prompt = self.k * max(self.unit_bytes[n] for n in owner.global_names)
        step = max(1, self.engine.work_bytes // max(1, per_prompt))
        n = len(self.prompt_ids)
        return [(i, min(n, i + step)) for i in range(0, n, step)]

    def _uses_ghost(self, owner: _Owner) -> bool:
        """Ghost norms for a linear layer in the first pass, where they are the cheaper (or asked
        for); never for a tied parameter (its uses' cross terms need the per-unit gradients) or
        with sketches (which need them too)."""
        module, choice = owner.module, self.engine.linear_norms
        if (self.mode != "sums" or choice == "direct" or not isinstance(module, torch.nn.Linear)
                or self.totals.sketch_dim is not None or any(self.engine.n_uses[n] > 1 for n in owner.global_names)):
            return False
        return choice == "ghost" or ghost_is_cheaper(self.prompt_tokens, module.in_features, module.out_features)

    def _chunk_units(self, first: int, last: int, device: torch.device) -> tuple[int, int, MicroBatchUnits]:
        """Rows [start, end) of local prompts [first, last) and their units, renumbered from 0."""
        row_start, row_end = self.unit_rows[first * self.k][0], self.unit_rows[last * self.k - 1][1]
        local_units = range(first * self.k, last * self.k)
        units = MicroBatchUnits(
            torch.tensor(self.row_unit[row_start:row_end], device=device) - first * self.k,
            [(self.unit_rows[u][0] - row_start, self.unit_rows[u][1] - row_start) for u in local_units],
            self.buffers.allocate)
        return row_start, row_end, units

    def _reduce_ghost(self, owner: _Owner, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Prompt Grams by the ghost norm and sums by one segment matmul per touched sum."""
        for first, last in self._chunks(owner):
            row_start, row_end, units = self._chunk_units(first, last, x.device)
            prompt_ids = self.prompt_ids[first:last]
            x_part, g_part = x[row_start:row_end], grad[row_start:row_end]
            grams = linear_ghost_grams(x_part, g_part, units, self.k, self.engine.dtype)
            rows, weights = self.totals.touched_sums(prompt_ids)
            sums = linear_segment_sums(x_part, g_part, units, weights, self.engine.dtype)
            for local, name in zip(owner.local_names, owner.global_names):
                self.totals.add_prompt_products(name, prompt_ids, grams[local])
                self.totals.add_sum_contributions(name, rows, sums[local])

    def _row_dots_by_rule(self, owner: _Owner, x: torch.Tensor, grad: torch.Tensor) -> bool:
        """Pass 2 by the module's row-dot rule, over the whole micro-batch at once (its
        temporaries are activation-sized); False when the module type has none."""
        rule = row_dot_rule_for(owner.module) if self.engine.row_dot_rules else None
        if self.mode != "row_dots" or rule is None:
            return False
        _, _, units = self._chunk_units(0, len(self.prompt_ids), x.device)
        unit_target = self.totals.unit_target[self.totals.prompt_units(self.prompt_ids)]
        global_of = dict(zip(owner.local_names, owner.global_names))
        values = rule(owner.module, owner.local_names, x, grad, units, unit_target,
                      lambda local, index: self.totals.target_of(global_of[local], index), self.engine.dtype)
        for local, name in global_of.items():
            self.totals.add_unit_row_dots(name, self.prompt_ids, values[local])
        return True

    def on_output_grad(self, owner: _Owner, grad: torch.Tensor) -> None:
        x = self.inputs.pop(id(owner.module), None)
        if x is None:  # checkpointed and not yet recomputed
            self.waiting[id(owner.module)] = grad
            return
        self._reduce_module(owner, x, grad)

    def _reduce_module(self, owner: _Owner, x: torch.Tensor, grad: torch.Tensor) -> None:
        names = owner.global_names
        self.totals.prepare_use(names)
        if not self.idle:
            self._reduce_use(owner, x, grad)
        self.totals.end_use(names)

    def _reduce_use(self, owner: _Owner, x: torch.Tensor, grad: torch.Tensor) -> None:
        if self._uses_ghost(owner):
            self._reduce_ghost(owner, x, grad)
        elif not self._row_dots_by_rule(owner, x, grad):
            self._reduce_per_unit(owner, x, grad)
        for name in owner.global_names:
            self.received[name] += 1

    def _reduce_per_unit(self, owner: _Owner, x: torch.Tensor, grad: torch.Tensor) -> None:
        """The module's per-unit gradients, a chunk of prompts at a time, reduced and freed."""
        for first, last in self._chunks(owner):
            row_start, row_end, units = self._chunk_units(first, last, x.device)
            self.in_rule = True
            try:
                parts = owner.rule(owner.module, owner.local_names, x[row_start:row_end], grad[row_start:row_end],
                                   units, self.engine.dtype)
            finally:
                self.in_rule = False
            for local, name in zip(owner.local_names, owner.global_names):
                self._reduce(name, first, parts[local], last_use=self.received[name] + 1 == self.engine.n_uses[name])
                self.buffers.give_back(parts[local].values)

    def _reduce(self, name: str, first: int, part: PerUnit, last_use: bool) -> None:
        """Add one use's per-unit gradients of a few prompts (local prompts first, first + 1, ...)."""
        prompt_ids = self.prompt_ids[first:first + part.values.shape[0] // self.k]
        if self.mode == "row_dots":
            self.totals.add_row_dots(name, prompt_ids, part)
            return
        self.totals.add_gram(name, prompt_ids, part)
        self.totals.add_sums(name, prompt_ids, part)
        if self.totals.sketch_dim is not None:
            self.totals.add_sketch(name, prompt_ids, part)
        if self.engine.n_uses[name] == 1:
            return
        for kept_first, kept in self.kept.get(name, []):
            self._add_cross(name, first, part, kept_first, kept)
        if not last_use:
            keep = restricted(part, self.token_rows) if name in self.engine.sparse_names else PerUnit(
                part.values.clone(), part.rows)
            self.kept.setdefault(name, []).append((first, keep))

    def _add_cross(self, name: str, first: int, part: PerUnit, kept_first: int, kept: PerUnit) -> None:
        """Cross terms between two uses of a tied parameter over the prompts both cover."""
        k = self.k
        start = max(first, kept_first)
        end = min(first + part.values.shape[0] // k, kept_first + kept.values.shape[0] // k)
        if start >= end:
            return
        mine = PerUnit(part.values[(start - first) * k:(end - first) * k], part.rows)
        theirs = PerUnit(kept.values[(start - kept_first) * k:(end - kept_first) * k], kept.rows)
        self.totals.add_gram(name, self.prompt_ids[start:end], mine, other=theirs)

    def end(self) -> None:
        if self.waiting:  # a checkpointed module was never recomputed: its units would be missed
            raise RuntimeError("a checkpointed module's gradient arrived without its recomputed input")
        self.inputs.clear()
        self.called.clear()
        self.kept.clear()
