"""The vmap engine: per-unit policy gradients with torch.func, reduced to Grams and linear sums.

(`gradients.hooked` computes the same from one forward and backward per micro-batch and is the
default where it applies; `gradients.stage` chooses. Both return `UnitGradients`.)

A *unit* is a set of completions whose gradient is wanted as one vector: a prompt's completions
with positive advantage, say. The engine knows nothing of tasks or prompts. It receives token
sequences with one loss coefficient per token and returns, for the selected parameters,

- within each block of units (a task's), the Gram matrix G[g, a, b] = <grad_a, grad_b> restricted
  to each module group g, where grad_a = d/dtheta sum_{s in unit a} sum_j coef_sj log pi(x_sj | x_s<j);
- the linear sums s_k = sum_a W[k, a] grad_a (task gradients), their dot products per group, and
  optionally the sums themselves (for saving and comparing).

Every norm, cosine, share and unbiased estimate of docs/metrics.md is a quadratic form of these (see
`estimators` and `summary`), so one pass serves them all exactly.

Per-unit gradients come from ``vmap(grad(unit_loss))`` over a chunk of units, each unit a padded
[K, L] batch of right-padded sequences (so causal attention never sees padding and no attention
mask is needed). Units with all-zero coefficients (degenerate groups) have a zero gradient and are
not computed. The Gram of all pairs in a block needs their gradients at once; they are kept in
"panels" of as many chunks as ``max_retained_bytes`` allows, and chunks outside the panel are
recomputed, so memory stays bounded and a model too large to retain everything costs more passes.

With ``checkpoint_activations`` the engine trades speed for memory on long completions: torch.func
transforms cannot run through torch.utils.checkpoint, so each unit's gradient is then taken with
plain autograd while every decoder layer recomputes its activations in the backward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad, vmap

from gradprobe.gradients.params import module_group
from gradprobe.objective import token_logprobs


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
class UnitGradients:
    """What an engine returns: within-block Gram matrices per module group, and linear sums.

    Blocks are sets of units (a task's units) whose every pair is needed (per-prompt norms, the
    U-statistic and its jackknife, the sign parts); across blocks only the linear sums meet.
    """

    param_names: list[str]
    param_shapes: list[tuple[int, ...]]
    groups: list[str]
    group_sizes: list[int]
    blocks: list[list[int]]
    """Unit indices of each block."""
    block_gram: list[torch.Tensor]
    """Per block, [n_groups, n_b, n_b] float64 on the CPU: <grad_a, grad_b> within each group."""
    sum_dots: torch.Tensor
    """[n_groups, n_sums, n_sums] float64: <s_i, s_j> per group for the sums s = W grads."""
    sums: dict[str, torch.Tensor] | None
    """Per parameter name, [n_sums, *shape]: the linear sums, when kept."""
    passes: int = 1
    chunk_size: int = 0
    engine: str = "vmap"
    nonfinite_units: list[int] = field(default_factory=list)

    def total(self, block: int) -> torch.Tensor:
        """[n_b, n_b]: a block's Gram over all selected parameters."""
        return self.block_gram[block].sum(0)

    def sum_of(self, k: int) -> dict[str, torch.Tensor]:
        """The k-th linear sum as named parameter tensors."""
        assert self.sums is not None
        return {name: value[k] for name, value in self.sums.items()}


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
def checkpointed_layers(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, each decoder layer keeps only its inputs and recomputes the rest in backward.

    Works in eval mode (no dropout), unlike `gradient_checkpointing_enable`, which only acts while
    training. Yields the number of layers wrapped.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
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

    def result(self, blocks: list[list[int]], block_gram: list[torch.Tensor], sums: dict[str, torch.Tensor],
               keep_sums: bool, engine: str, passes: int, chunk_size: int) -> UnitGradients:
        """An engine's `UnitGradients`, with the sums' dot products per group; `sums[name]` is
        [n_sums, ...] (any shape after the first axis)."""
        n_sums = next(iter(sums.values())).shape[0]
        sum_dots = torch.zeros((len(self.groups), n_sums, n_sums), dtype=torch.float64)
        for name, value in sums.items():
            flat = value.reshape(n_sums, -1)
            sum_dots[self.group_of[name]] += (flat @ flat.T).to("cpu", torch.float64)
        return UnitGradients(
            param_names=self.names,
            param_shapes=[self.shapes[n] for n in self.names],
            groups=self.groups,
            group_sizes=self.group_sizes,
            blocks=[list(b) for b in blocks],
            block_gram=[g.cpu() for g in block_gram],
            sum_dots=sum_dots,
            sums={n: sums[n].reshape(n_sums, *self.shapes[n]).cpu() for n in self.names} if keep_sums else None,
            passes=passes,
            chunk_size=chunk_size,
            engine=engine,
        )


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


class GradientEngine:
    """Computes per-unit gradients of a causal LM chunk by chunk, reduced as the module says."""

    def __init__(
        self,
        model: torch.nn.Module,
        param_names: list[str],
        temperature: float = 1.0,
        accumulate_dtype: torch.dtype = torch.float32,
        pad_token_id: int = 0,
        checkpoint_activations: bool = False,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.checkpoint_activations = checkpoint_activations
        use_eager_attention(model)
        self.selected = SelectedParameters.of(model, param_names, accumulate_dtype)
        self.names, self.dtype, self.device = self.selected.names, self.selected.dtype, self.selected.device
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in self.names}
        self.temperature = temperature
        self.pad_token_id = pad_token_id

    def _unit_loss(self, params: dict[str, torch.Tensor] | None, ids: torch.Tensor,
                   coef: torch.Tensor, first: int) -> torch.Tensor:
        """sum_j coef_j log pi(x_j | x_<j) over positions j >= first of a unit's sequences.

        Only the logits that predict positions >= first are computed (`logits_to_keep`): prompt
        positions carry no loss, and the vocabulary projection is a large part of the cost.
        With `params` None the model runs with its own parameters (the checkpointed path).
        """
        keep = ids.shape[-1] - first + 1
        kwargs = {"use_cache": False, "logits_to_keep": keep}
        if params is None:
            logits = self.model(ids, **kwargs).logits
        else:
            logits = functional_call(self.model, params, (ids,), kwargs).logits
        logp = token_logprobs(logits.to(self.dtype), ids[..., first - 1 :], self.temperature)
        return (coef[..., first:] * logp).sum()

    def _pad_chunk(self, batch: UnitBatch, units: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[units, width, length] ids and coefficients, a unit's missing sequences all padding."""
        width = max(len(batch.units[u]) for u in units)
        rows = [s for u in units for s in batch.units[u] + [None] * (width - len(batch.units[u]))]
        ids, coef, first = pad_rows(batch, rows, self.pad_token_id, self.dtype)
        shape = (len(units), width, ids.shape[-1])
        return ids.view(shape).to(self.device), coef.view(shape).to(self.device), first

    def unit_gradients(self, batch: UnitBatch, units: list[int]) -> dict[str, torch.Tensor]:
        """Gradients of `units` per parameter name, [len(units), n_elements] each.

        Kept per parameter (views, no concatenation): copying c x n_selected floats into one
        matrix cost a third of the stage on CPU.
        """
        ids, coef, first = self._pad_chunk(batch, units)
        loss = functools.partial(self._unit_loss, first=first)
        if self.checkpoint_activations:
            grads = self._checkpointed_gradients(loss, ids, coef)
        else:
            grads = vmap(grad(loss), in_dims=(None, 0, 0))(self.params, ids, coef)
        return {n: grads[n].reshape(len(units), -1).to(self.dtype) for n in self.names}

    def _checkpointed_gradients(self, loss: Callable, ids: torch.Tensor, coef: torch.Tensor
                                ) -> dict[str, torch.Tensor]:
        """Per-unit gradients one unit at a time with plain autograd and recomputed activations.

        The model runs with its own parameters (a recomputation in backward happens outside any
        functional_call), the selected ones switched to requires_grad for the duration.
        """
        named = dict(self.model.named_parameters())
        selected = [named[n] for n in self.names]
        rows: list[tuple[torch.Tensor, ...]] = []
        try:
            for parameter in selected:
                parameter.requires_grad_(True)
            with checkpointed_layers(self.model), torch.enable_grad():
                for i in range(ids.shape[0]):
                    rows.append(torch.autograd.grad(loss(None, ids[i], coef[i]), selected,
                                                    allow_unused=True, materialize_grads=True))
        finally:
            self.model.requires_grad_(False)
        return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(self.names)}

    def _gram_block(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
        """[n_groups, len(x units), len(y units)]: per-group inner products of two chunks."""
        blocks = []
        for members in self.selected.group_members:
            block = sum(x[n] @ y[n].T for n in members)
            blocks.append(block)
        return torch.stack(blocks).to("cpu", torch.float64)

    def plan_chunk_size(self, batch: UnitBatch, max_memory: int) -> int:
        """Units per chunk so that per-unit gradients and activations use about half `max_memory`.

        Per unit: its gradient (n_selected values, held about three times over by vmap, the
        dtype cast and the Gram products) plus activations, estimated per token as
        4 bytes x (3 x vocab + 24 x hidden x layers), which upper-bounds a decoder's saved tensors.
        """
        config = getattr(self.model, "config", None)
        vocab = getattr(config, "vocab_size", 32000)
        hidden = getattr(config, "hidden_size", 1024)
        layers = getattr(config, "num_hidden_layers", 8)
        n_selected = self.selected.n_selected
        width = max((len(u) for u in batch.units), default=1)
        length = max((len(s) for s in batch.sequences), default=1)
        element = torch.finfo(self.dtype).bits // 8
        tokens = width * length
        # Past 16 units a vmapped call is slower per unit on CPU (benchmarks/RESULTS.md).
        largest = 64 if self.device.type == "cuda" else 16
        if self.checkpoint_activations:
            # One unit's activations at a time: layer inputs plus one layer's worth and the logits.
            activations = tokens * 4 * (3 * vocab + 24 * hidden + 2 * hidden * layers)
            return int(max(1, min(largest, (max_memory // 2 - activations) // (3 * n_selected * element))))
        per_unit = 3 * n_selected * element + tokens * activation_bytes_per_token(self.model)
        return int(max(1, min(largest, (max_memory // 2) // per_unit)))

    def run_adaptive(self, batch: UnitBatch, blocks: list[list[int]], sum_weights: torch.Tensor,
                     chunk_size: int, max_retained_bytes: int,
                     on_chunk: Callable[[int], None] | None = None,
                     on_retry: Callable[[int], None] | None = None, keep_sums: bool = True) -> UnitGradients:
        """`run`, halving the chunk size (and the retained panel) after an out-of-memory error,
        down to one unit. Results do not depend on the chunk size (to rounding)."""
        return halving_on_out_of_memory(
            lambda size: self.run(batch, blocks, sum_weights, size, max_retained_bytes * size // chunk_size,
                                  on_chunk, keep_sums),
            chunk_size, 1, self.device, on_retry)

    def run(
        self,
        batch: UnitBatch,
        blocks: list[list[int]],
        sum_weights: torch.Tensor,
        chunk_size: int = 8,
        max_retained_bytes: int = 2 << 30,
        on_chunk: Callable[[int], None] | None = None,
        keep_sums: bool = True,
    ) -> UnitGradients:
        """Gram matrices within `blocks` and the sums ``sum_weights @ grads``, in one or more passes.

        Chunks run in unit order; a pair of chunks with no block in common is skipped.
        `on_chunk(n_units)` is called after each chunk of the first pass (for progress bars).
        """
        n_units = len(batch.units)
        unit_block = torch.full((n_units,), -1, dtype=torch.long)
        for b, members in enumerate(blocks):
            unit_block[torch.as_tensor(members, dtype=torch.long)] = b
        active = [u for u in range(n_units) if batch.is_active(u)]
        chunks = [active[i : i + chunk_size] for i in range(0, len(active), chunk_size)]
        chunk_blocks = [set(unit_block[units].tolist()) - {-1} for units in chunks]
        row_bytes = self.selected.n_selected * torch.finfo(self.dtype).bits // 8
        panel_len = max(1, max_retained_bytes // max(1, chunk_size * row_bytes))
        block_gram = [torch.zeros((len(self.selected.groups), len(b), len(b)), dtype=torch.float64) for b in blocks]
        position = {u: i for members in blocks for i, u in enumerate(members)}
        block_of = unit_block.tolist()
        weights = sum_weights.to(self.device, self.dtype)
        sums = {n: torch.zeros((weights.shape[0], self.params[n].numel()), dtype=self.dtype,
                               device=self.device) for n in self.names}
        nonfinite: list[int] = []
        passes = 0
        for start in range(0, len(chunks), panel_len):
            passes += 1
            panel: list[tuple[int, dict[str, torch.Tensor]]] = []
            panel_blocks = set().union(*chunk_blocks[start : start + panel_len])
            for ci in range(start, len(chunks)):
                units = chunks[ci]
                if start > 0 and ci >= start + panel_len and not chunk_blocks[ci] & panel_blocks:
                    continue  # a recomputation would pair with nothing in this panel
                x = self.unit_gradients(batch, units)
                if on_chunk is not None and start == 0:
                    on_chunk(len(units))
                if start == 0:
                    bad = torch.zeros(len(units), dtype=torch.bool, device=self.device)
                    for value in x.values():
                        bad |= ~torch.isfinite(value).all(1)
                    nonfinite += [units[i] for i in bad.nonzero().flatten().tolist()]
                    for n, value in x.items():
                        sums[n] += weights[:, units] @ value
                if ci < start + panel_len:
                    panel.append((ci, x))
                for pi, p in panel:
                    if not chunk_blocks[pi] & chunk_blocks[ci]:
                        continue
                    products = self._gram_block(p, x)
                    for b in chunk_blocks[pi] & chunk_blocks[ci]:
                        i = [k for k, u in enumerate(chunks[pi]) if block_of[u] == b]
                        j = [k for k, u in enumerate(units) if block_of[u] == b]
                        rows = torch.tensor([position[chunks[pi][k]] for k in i])[:, None]
                        cols = torch.tensor([position[units[k]] for k in j])[None, :]
                        part = products[:, i][:, :, j]
                        block_gram[b][:, rows, cols] = part
                        block_gram[b][:, cols.T, rows.T] = part.transpose(1, 2)
            if nonfinite:
                raise NonFiniteGradientError(sorted(nonfinite))
        return self.selected.result(blocks, block_gram, sums, keep_sums, "vmap", passes, chunk_size)
