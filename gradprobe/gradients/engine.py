"""What the gradient engines share: their input, their result, and the streaming reductions.

A *unit* is a set of completions whose gradient is wanted as one vector: a prompt's completions
with positive advantage, say (docs/engine.md, "Units"). The engines know nothing of tasks. They
receive token sequences with one loss coefficient per token, grouped into units and the units
into prompts, and return for the selected parameters, per module group g,

- each prompt's Gram of its own units, G[g, p, a, b] = <grad_a, grad_b> for units a, b of p, where
  grad_a = d/dtheta sum_{s in unit a} sum_j coef_sj log pi(x_sj | x_s<j);
- the linear sums s_k = sum_a W[k, a] grad_a (the tasks' sign sums), their dot products, and
  optionally the sums themselves (for saving and comparing);
- optionally the row dots <grad_a, t_a>, each unit against a target vector that is a linear
  combination of the sums (its task gradient); known only once the sums are complete, so they
  take a second pass.

Nothing of size units x parameters is ever held: per-unit gradients are reduced into these as
they are made and freed, so memory does not grow with the number of prompts (beyond O(units)
scalars). Every norm, cosine, share, U-statistic and jackknife interval of docs/metrics.md is a
function of these (`summary`). Two engines fill them: `hooked` (one forward and backward per
micro-batch; the default) and `vmap_engine` (torch.func, for models the hooks cannot serve).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gradprobe.gradients.params import module_group
from gradprobe.gradients.unit_rules import PerUnit, add_weighted, prompt_products

@dataclass
class UnitBatch:
    """Token sequences with per-token loss coefficients, grouped into units."""

    sequences: list[list[int]]
    """Prompt followed by completion tokens, one list per sequence."""
    coefficients: list[list[float]]
    """d(unit loss)/d(log pi(token j)) per token of each sequence; 0 for prompt tokens."""
    units: list[list[int]]
    """For each unit, the indices of its sequences."""

    def is_active(self, unit: int) -> bool:
        return any(c != 0.0 for s in self.units[unit] for c in self.coefficients[s])


@dataclass
class Reductions:
    """What per-unit gradients are reduced into, besides each prompt's Gram of its units."""

    prompts: list[list[int]]
    """Each prompt's units (the same number for every prompt, in unit order)."""
    sum_weights: torch.Tensor
    """[n_sums, n_units]: s_k = sum_a W[k, a] grad_a."""
    targets: torch.Tensor
    """[n_targets, n_sums]: target vectors of the row dots, as combinations of the sums."""
    unit_target: list[int]
    """Per unit, the index of its target."""

    @property
    def units_per_prompt(self) -> int:
        return len(self.prompts[0]) if self.prompts else 1


@dataclass(frozen=True)
class SumShards:
    """Sums sharded over `world` processes: this one (`rank`) holds, per parameter of n
    coordinates, [n_sums, ceil(n / world)], the flat coordinates [rank x shard, (rank + 1) x shard)
    of the [n_sums, n] sums, zero past n."""

    rank: int
    world: int

    def length(self, numel: int) -> int:
        """Coordinates per shard: ceil(numel / world)."""
        return -(-numel // self.world)


@dataclass
class UnitGradients:
    """What an engine returns (float64 on the CPU unless said otherwise)."""

    param_names: list[str]
    param_shapes: list[tuple[int, ...]]
    groups: list[str]
    group_sizes: list[int]
    prompts: list[list[int]]
    prompt_gram: torch.Tensor
    """[n_groups, n_prompts, k, k]: <grad_a, grad_b> for the k units a, b of each prompt."""
    sum_dots: torch.Tensor
    """[n_groups, n_sums, n_sums]: <s_i, s_j> per group for the sums s = W grads."""
    sums: dict[str, torch.Tensor] | None
    """Per parameter name, [n_sums, *shape] (float32 or the accumulation dtype), when kept."""
    row_dots: torch.Tensor | None
    """[n_groups, n_units]: <grad_a, target of a> per group (exact intervals), else None."""
    sketched_row_dots: torch.Tensor | None = None
    """[n_units]: <P grad_a, P target of a> over all selected parameters through a count sketch P
    of `sketch_dim` buckets (sketched intervals), else None."""
    sketch_dim: int | None = None
    passes: int = 1
    micro_batch: int = 0
    """The most units one forward and backward (or vmapped call) held."""
    engine: str = "hooks"
    sums_device: str = "cpu"
    sum_shards: SumShards | None = None
    """When set, `sums` hold this process's shard of each parameter's flattened sums."""

    def total_prompt_gram(self) -> torch.Tensor:
        """[n_prompts, k, k] over all selected parameters."""
        return self.prompt_gram.sum(0)

    def sum_of(self, k: int) -> dict[str, torch.Tensor]:
        """The k-th linear sum as named parameter tensors."""
        assert self.sums is not None
        return {name: value[k] for name, value in self.sums.items()}

    def paired_sums(self) -> Mapping[str, torch.Tensor]:
        """Per parameter, [n_sums / 2, *shape]: sums 2t and 2t+1 added (a task's two sign sums
        give its gradient), formed one parameter at a time as it is read, where the sums live."""
        assert self.sums is not None
        return _PairedSums(self.sums)


class _PairedSums(Mapping):
    def __init__(self, sums: dict[str, torch.Tensor]) -> None:
        self.sums = sums

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.sums[name]
        return value.view(value.shape[0] // 2, 2, *value.shape[1:]).sum(1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sums)

    def __len__(self) -> int:
        return len(self.sums)


class EngineOutOfMemory(RuntimeError):
    """Even one unit per chunk did not fit in memory."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure message."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError)
        and ("can't allocate memory" in text or "not enough memory" in text)
    )


def halving_on_out_of_memory(attempt: Callable[[int], UnitGradients], size: int, smallest: int,
                             device: torch.device, on_retry: Callable[[int], None] | None = None) -> UnitGradients:
    """attempt(size), and after an out-of-memory error attempt(size // 2), ... down to `smallest`;
    EngineOutOfMemory when even that fails. `on_retry(new_size)` is told of each retry."""
    while True:
        try:
            return attempt(size)
        except (RuntimeError, MemoryError) as error:
            if not (isinstance(error, MemoryError) or is_out_of_memory(error)):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if size <= smallest:
                raise EngineOutOfMemory(str(error).splitlines()[0]) from None
            size = max(smallest, size // 2)
            if on_retry is not None:
                on_retry(size)


class NonFiniteGradientError(RuntimeError):
    """Some units had NaN or Inf gradients; `units` lists them."""

    def __init__(self, units: list[int]) -> None:
        super().__init__(f"non-finite gradients in units {units}")
        self.units = units


def use_eager_attention(model: torch.nn.Module) -> None:
    """Switch a Hugging Face model to eager attention for the vmapped gradient pass.

    vmap has no batching rule for the backward of scaled_dot_product_attention and falls back to
    a slow per-sample loop (docs/engine.md); eager attention is plain batched matmuls.
    """
    setter = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    if setter is not None and getattr(config, "_attn_implementation", "eager") != "eager":
        try:
            setter("eager")
        except (ValueError, NotImplementedError):
            pass  # a model without an eager path keeps its own; it is still correct, only slower


@contextmanager
def checkpointed_layers(model: torch.nn.Module,
                        context_fn: Callable[[], tuple[object, object]] | None = None) -> Iterator[int]:
    """Within the block, each decoder layer keeps only its inputs and recomputes the rest in backward.

    Works in eval mode (no dropout), unlike `gradient_checkpointing_enable`, which only acts while
    training. `context_fn` (torch.utils.checkpoint's) gives the context managers of the original
    forward and of the recomputation, so hooks can tell the two apart. Yields the number of layers
    wrapped.
    """
    from torch.utils.checkpoint import checkpoint, noop_context_fn
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False,
                                          context_fn=context_fn or noop_context_fn)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # back to the class's method


@dataclass
class SelectedParameters:
    """The parameters an engine differentiates, ordered so each module group is one slice."""

    names: list[str]
    groups: list[str]
    group_of: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    """Of per-unit gradients and sums: the accumulation dtype promoted with the parameters'."""
    device: torch.device

    @classmethod
    def of(cls, model: torch.nn.Module, param_names: list[str], accumulate_dtype: torch.dtype) -> SelectedParameters:
        groups = list(dict.fromkeys(module_group(n) for n in param_names))
        names = sorted(param_names, key=lambda n: groups.index(module_group(n)))
        named = dict(model.named_parameters())
        first = named[names[0]]
        return cls(names, groups, {n: groups.index(module_group(n)) for n in names},
                   {n: tuple(named[n].shape) for n in names},
                   torch.promote_types(accumulate_dtype, first.dtype), first.device)

    def size(self, name: str) -> int:
        return math.prod(self.shapes[name])

    @property
    def group_members(self) -> list[list[str]]:
        return [[n for n in self.names if self.group_of[n] == g] for g in range(len(self.groups))]

    @property
    def group_sizes(self) -> list[int]:
        return [sum(self.size(n) for n in members) for members in self.group_members]

    @property
    def n_selected(self) -> int:
        return sum(self.size(n) for n in self.names)



def pad_rows(batch: UnitBatch, rows: list[int | None], pad_token_id: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """[rows, length] token ids and loss coefficients of right-padded sequences (None: a row of
    padding), and the first position with a coefficient (at least 1: position 0 has no logit)."""
    length = max(len(batch.sequences[s]) for s in rows if s is not None)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    coef = torch.zeros((len(rows), length), dtype=dtype)
    for row, s in enumerate(rows):
        if s is not None:
            n = len(batch.sequences[s])
            ids[row, :n] = torch.tensor(batch.sequences[s])
            coef[row, :n] = torch.tensor(batch.coefficients[s], dtype=dtype)
    nonzero = (coef != 0).any(0).nonzero()
    return ids, coef, max(1, int(nonzero[0])) if len(nonzero) else 1


def activation_bytes_per_token(model: torch.nn.Module) -> int:
    """4 bytes x (3 x vocab + 24 x hidden x layers): an upper bound on a decoder's saved
    tensors per token in a forward and backward (logits and their softmax, each layer's)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", 32000)
    hidden = getattr(config, "hidden_size", 1024)
    layers = getattr(config, "num_hidden_layers", 8)
    return 4 * (3 * vocab + 24 * hidden * layers)




class PassCompletion(Protocol):
    """What completes the reductions after each pass when several processes each ran a share of
    the prompts (`gradprobe.distributed`): every reduction is a sum over prompts, so adding the
    processes' partial reductions gives the whole one."""

    def complete_sums(self, totals: StreamingReductions) -> None:
        """After pass 1: prompt Grams, sums and unit sketches made whole on every process."""

    def complete_row_dots(self, totals: StreamingReductions) -> None:
        """After pass 2: row dots made whole."""

    def schedule(self, plan: Callable[[UnitBatch], list[list[int]]]) -> list[list[int] | None]:
        """This process's micro-batches, given how one process's prompts are planned (`plan` of
        a batch whose other prompts carry no loss); None at a step where it has none but must
        still run a forward and backward, to meet the others' collectives inside them (FSDP2's,
        and the sharded sums'). Every process gets the same number of steps when any does."""

    def new_reductions(self, selected: SelectedParameters, reductions: Reductions,
                       sums_device: torch.device | None, sketch_dim: int | None) -> StreamingReductions:
        """The reductions the engine fills (sharded sums, or the plain ones)."""


class StreamingReductions:
    """The running reductions of one engine run: prompt Grams and sums (pass 1), row dots (pass 2).

    Callers hand over per-unit gradients of one parameter for the units of whole prompts
    (`prompt_ids`, each prompt's k units in order); everything is added at once and nothing
    per-unit is kept. The sums live on `sums_device` (the model's device, or host memory when the
    device cannot hold them: contributions are formed on the device and added there). Engines
    call `end_pass_one` and `end_pass_two`; with a `completion` these combine the processes'
    partial reductions (pass 2 needs the complete sums).
    """

    def __init__(self, selected: SelectedParameters, reductions: Reductions,
                 sums_device: torch.device | None = None, sketch_dim: int | None = None,
                 sketch_seed: int = 0, completion: PassCompletion | None = None) -> None:
        self.selected, self.reductions = selected, reductions
        self.completion = completion
        self.k = reductions.units_per_prompt
        device = selected.device
        # Host-resident when asked for: contributions are formed on the device, then moved.
        self.hosted = sums_device is not None
        self.sums_device = torch.device(sums_device) if sums_device is not None else device
        n_groups, n_sums = len(selected.groups), reductions.sum_weights.shape[0]
        self.prompt_gram = torch.zeros((n_groups, len(reductions.prompts), self.k, self.k),
                                       dtype=torch.float64, device=device)
        self.weights = reductions.sum_weights.to(device, selected.dtype)
        self.sums = self.allocate_sums(n_sums)
        self.row_dots = torch.zeros((n_groups, reductions.sum_weights.shape[1]), dtype=torch.float64, device=device)
        self.targets = reductions.targets.to(self.sums_device, selected.dtype)
        self.unit_target = torch.as_tensor(reductions.unit_target, device=device)
        self.sketch_dim, self.sketch_seed = sketch_dim, sketch_seed
        if sketch_dim is not None:  # bucket sums of each sign, [units, 2 x dim] (projection.add_count_sketch)
            self.unit_sketch = torch.zeros((reductions.sum_weights.shape[1], 2 * sketch_dim),
                                           dtype=torch.float64, device=device)

    def allocate_sums(self, n_sums: int) -> dict[str, torch.Tensor]:
        """Per parameter, [n_sums, *shape] zeros where the sums live (pinned when on the host
        for a CUDA model)."""
        pinned = self.sums_device.type == "cpu" and self.selected.device.type == "cuda"
        return {n: torch.zeros((n_sums, *self.selected.shapes[n]), dtype=self.selected.dtype,
                               device=self.sums_device, pin_memory=pinned) for n in self.selected.names}

    # Steps and uses: hooks for sums kept elsewhere (`gradprobe.distributed.sharded`); no-ops here.
    def begin_step(self, step: int) -> None:
        """Micro-batch `step` of the pass begins (the same step on every process)."""

    def prepare_use(self, names: list[str]) -> None:
        """One use of these parameters is about to be reduced (every process, every step)."""

    def end_use(self, names: list[str]) -> None:
        """That use of these parameters is reduced (every process, every step)."""

    def prompt_units(self, prompt_ids: list[int]) -> torch.Tensor:
        """Global unit indices of these prompts, in order."""
        units = [u for p in prompt_ids for u in self.reductions.prompts[p]]
        return torch.tensor(units, device=self.selected.device)

    def add_gram(self, name: str, prompt_ids: list[int], part: PerUnit, other: PerUnit | None = None) -> None:
        """Each prompt's Gram of its units (`part` holds the prompts' units in order); with
        `other` (another use of a tied parameter, same units) the cross terms
        <a_i, b_j> + <b_i, a_j> instead."""
        if other is None:
            products = prompt_products(part, part, self.k)
        else:
            cross = prompt_products(part, other, self.k)
            products = cross + cross.transpose(1, 2)
        self.add_prompt_products(name, prompt_ids, products)

    def add_prompt_products(self, name: str, prompt_ids: list[int], products: torch.Tensor) -> None:
        """prompt_gram[group of name, prompt_ids] += products ([len(prompt_ids), k, k])."""
        ids = torch.tensor(prompt_ids, device=self.selected.device)
        self.prompt_gram[self.selected.group_of[name]].index_add_(0, ids, products.to(torch.float64))

    def touched_sums(self, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums these prompts' units contribute to, and their weights [sums, units]."""
        weights = self.weights[:, self.prompt_units(prompt_ids)]
        rows = (weights != 0).any(1).nonzero().flatten()
        return rows, weights[rows]

    def add_sums(self, name: str, prompt_ids: list[int], part: PerUnit) -> None:
        """sums[name] += W[:, units] @ part, only over the sums these units touch."""
        rows, weights = self.touched_sums(prompt_ids)
        total = self.sums[name]
        if not self.hosted:  # in place, a row at a time: a temporary would be page-faulted in on CPU
            if len(rows) == total.shape[0]:
                add_weighted(total, weights, part)
            else:
                for i, r in enumerate(rows.tolist()):
                    add_weighted(total[r:r + 1], weights[i:i + 1], part)
            return
        contribution = torch.zeros((len(rows), *total.shape[1:]), dtype=total.dtype, device=self.selected.device)
        add_weighted(contribution, weights, part)
        self.add_sum_contributions(name, rows, contribution)

    def add_sum_contributions(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """sums[name][rows] += values, formed on the device and moved where the sums live."""
        self.sums[name].index_add_(0, rows.to(self.sums_device), values.to(self.sums_device, self.sums[name].dtype))

    def target_of(self, name: str, index: int) -> torch.Tensor:
        """Target vector `index` restricted to one parameter, on the compute device."""
        value = torch.tensordot(self.targets[index], self.sums[name], dims=1)
        return value.to(self.selected.device)

    def add_row_dots(self, name: str, prompt_ids: list[int], part: PerUnit) -> None:
        """row_dots[group, a] += <part_a, target of a> for these prompts' units (pass 2)."""
        units = self.prompt_units(prompt_ids)
        group = self.selected.group_of[name]
        local_targets = self.unit_target[units]
        for index in torch.unique(local_targets).tolist():
            mine = (local_targets == index).nonzero().flatten()
            target = self.target_of(name, index)
            if part.rows is not None:
                target = target[part.rows]
            values = part.values[mine].reshape(len(mine), -1)
            self.row_dots[group, units[mine]] += (values @ target.reshape(-1).to(values.dtype)).to(torch.float64)

    def add_unit_row_dots(self, name: str, prompt_ids: list[int], values: torch.Tensor) -> None:
        """row_dots[group, a] += values[i] for the i-th unit a of these prompts (pass 2, from a
        module's row-dot rule)."""
        group = self.selected.group_of[name]
        self.row_dots[group].index_add_(0, self.prompt_units(prompt_ids), values.to(torch.float64))

    def add_sketch(self, name: str, prompt_ids: list[int], part: PerUnit) -> None:
        """Each unit's count sketch of this parameter's gradient, added to its running sketch
        (the same buckets and signs as the saved task gradients' projection, docs/engine.md)."""
        from gradprobe.gradients.projection import add_count_sketch, add_count_sketch_rows

        units = self.prompt_units(prompt_ids)
        halves = torch.zeros((len(units), 2 * self.sketch_dim), dtype=torch.float64, device=self.selected.device)
        if part.rows is None:
            add_count_sketch(part.values, name, self.sketch_seed, halves)
        else:
            add_count_sketch_rows(part.values, part.rows, self.selected.shapes[name], name, self.sketch_seed, halves)
        self.unit_sketch.index_add_(0, units, halves)

    def sketched_row_dots(self) -> torch.Tensor:
        """[units]: <P grad_a, P t_a>, the target sketches formed from the unit sketches by the
        same linear maps as the targets from the gradients (P is linear)."""
        dim = self.sketch_dim
        sketch = self.unit_sketch[:, :dim] - self.unit_sketch[:, dim:]
        weights = self.reductions.sum_weights.to(sketch.device, torch.float64)
        targets = self.reductions.targets.to(sketch.device, torch.float64) @ (weights @ sketch)
        return (sketch * targets[self.unit_target]).sum(1)

    def end_pass_one(self) -> None:
        """Pass 1 is over here; with a `completion`, complete the reductions across processes.
        Then NonFiniteGradientError when any unit's gradient is not finite."""
        if self.completion is not None:
            self.completion.complete_sums(self)
        if bad := self.nonfinite_units():
            raise NonFiniteGradientError(bad)

    def end_pass_two(self) -> None:
        if self.completion is not None:
            self.completion.complete_row_dots(self)

    def nonfinite_units(self) -> list[int]:
        """Units whose squared norm (a prompt Gram's diagonal, any group) is NaN or Inf."""
        diagonal = self.prompt_gram.diagonal(dim1=2, dim2=3)  # [groups, prompts, k]
        bad = (~torch.isfinite(diagonal)).any(0).nonzero().tolist()
        return sorted(self.reductions.prompts[p][a] for p, a in bad)

    def result(self, keep_sums: bool, with_row_dots: bool, engine: str, passes: int,
               micro_batch: int) -> UnitGradients:
        """The run's `UnitGradients`; the sums' dot products accumulated in float64 per group."""
        sum_dots = self.sum_dots()
        return UnitGradients(
            param_names=self.selected.names,
            param_shapes=[self.selected.shapes[n] for n in self.selected.names],
            groups=self.selected.groups,
            group_sizes=self.selected.group_sizes,
            prompts=[list(p) for p in self.reductions.prompts],
            prompt_gram=self.prompt_gram.cpu(),
            sum_dots=sum_dots,
            sums=self.sums if keep_sums else None,
            row_dots=self.row_dots.cpu() if with_row_dots else None,
            sketched_row_dots=None if self.sketch_dim is None else self.sketched_row_dots().cpu(),
            sketch_dim=self.sketch_dim,
            passes=passes,
            micro_batch=micro_batch,
            engine=engine,
            sums_device=str(self.sums_device),
            sum_shards=self.sum_shards(),
        )

    def sum_dots(self) -> torch.Tensor:
        """[groups, n_sums, n_sums]: <s_i, s_j> per group, in float64."""
        n_sums = self.reductions.sum_weights.shape[0]
        sum_dots = torch.zeros((len(self.selected.groups), n_sums, n_sums), dtype=torch.float64)
        for name, value in self.sums.items():
            sum_dots[self.selected.group_of[name]] += float64_gram(value.reshape(n_sums, -1)).cpu()
        return sum_dots

    def sum_shards(self) -> SumShards | None:
        """How the sums are split over processes; None: each holds them whole."""
        return None


def float64_gram(rows: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """rows @ rows.T accumulated in float64, chunk by chunk of columns (the sums are float32:
    sign parts that nearly cancel must not lose the task gradient's norm to float32 rounding)."""
    out = torch.zeros((rows.shape[0], rows.shape[0]), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], chunk):
        piece = rows[:, start:start + chunk].to(torch.float64)
        out += piece @ piece.T
    return out
