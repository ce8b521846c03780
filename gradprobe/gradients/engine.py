"""Per-unit policy gradients with torch.func, reduced to a Gram matrix and linear sums.

A *unit* is a set of completions whose gradient is wanted as one vector: a prompt's completions
with positive advantage, say. The engine knows nothing of tasks or prompts. It receives token
sequences with one loss coefficient per token and returns, for the selected parameters,

- the Gram matrix G[g, a, b] = <grad_a, grad_b> restricted to each module group g, where
  grad_a = d/dtheta sum_{s in unit a} sum_j coef_sj * log pi(x_sj | x_s<j);
- optional linear sums sum_a W[k, a] grad_a (task gradients, for saving and comparing).

Every norm, cosine, share and unbiased estimate of metrics.md is a quadratic form of G (see
`estimators`), so this one pass serves them all exactly.

Per-unit gradients come from ``vmap(grad(unit_loss))`` over a chunk of units, each unit a padded
[K, L] batch of right-padded sequences (so causal attention never sees padding and no attention
mask is needed). Units with all-zero coefficients (degenerate groups) have a zero gradient and are
not computed. The Gram of all pairs needs all per-unit gradients at once; they are kept in
"panels" of as many chunks as ``max_retained_bytes`` allows, and chunks outside the panel are
recomputed, so memory stays bounded and a model too large to retain everything costs more passes.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """What the engine returns: Gram matrices per module group and linear sums."""

    param_names: list[str]
    param_shapes: list[tuple[int, ...]]
    groups: list[str]
    group_sizes: list[int]
    gram: torch.Tensor
    """[n_groups, n_units, n_units], float64 on the CPU."""
    sums: torch.Tensor | None
    """[n_sums, n_selected_parameters] flattened in `param_names` order, or None."""
    passes: int = 1
    chunk_size: int = 0
    nonfinite_units: list[int] = field(default_factory=list)

    @property
    def total_gram(self) -> torch.Tensor:
        return self.gram.sum(0)

    def unflatten(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split one flattened sum back into named parameter tensors."""
        out, offset = {}, 0
        for name, shape in zip(self.param_names, self.param_shapes):
            size = int(torch.Size(shape).numel())
            out[name] = row[offset : offset + size].view(shape)
            offset += size
        return out


class NonFiniteGradientError(RuntimeError):
    """Some units had NaN or Inf gradients; `units` lists them."""

    def __init__(self, units: list[int]) -> None:
        super().__init__(f"non-finite gradients in units {units}")
        self.units = units


def _ordered_by_group(names: list[str]) -> tuple[list[str], list[str], list[int]]:
    """Parameter names sorted so each module group is one contiguous slice."""
    groups: list[str] = []
    for name in names:
        if module_group(name) not in groups:
            groups.append(module_group(name))
    ordered = sorted(names, key=lambda n: groups.index(module_group(n)))
    return ordered, groups, [groups.index(module_group(n)) for n in ordered]


class GradientEngine:
    """Computes per-unit gradients of a causal LM chunk by chunk, reduced as the module says."""

    def __init__(
        self,
        model: torch.nn.Module,
        param_names: list[str],
        temperature: float = 1.0,
        accumulate_dtype: torch.dtype = torch.float32,
        pad_token_id: int = 0,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.names, self.groups, group_index = _ordered_by_group(param_names)
        named = dict(model.named_parameters())
        self.params = {n: named[n].detach() for n in self.names}
        self.shapes = [tuple(self.params[n].shape) for n in self.names]
        sizes = [self.params[n].numel() for n in self.names]
        self.group_slices = []
        offset = 0
        for g in range(len(self.groups)):
            size = sum(s for s, gi in zip(sizes, group_index) if gi == g)
            self.group_slices.append(slice(offset, offset + size))
            offset += size
        self.n_selected = offset
        self.temperature = temperature
        self.dtype = torch.promote_types(accumulate_dtype, next(iter(self.params.values())).dtype)
        self.pad_token_id = pad_token_id
        self.device = next(iter(self.params.values())).device

    def _unit_loss(self, params: dict[str, torch.Tensor], ids: torch.Tensor, coef: torch.Tensor):
        logits = functional_call(self.model, params, (ids,), {"use_cache": False}).logits
        logp = token_logprobs(logits.to(self.dtype), ids, self.temperature)
        return (coef[..., 1:] * logp).sum()

    def _pad_chunk(self, batch: UnitBatch, units: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(batch.units[u]) for u in units)
        length = max(len(batch.sequences[s]) for u in units for s in batch.units[u])
        ids = torch.full((len(units), width, length), self.pad_token_id, dtype=torch.long)
        coef = torch.zeros((len(units), width, length), dtype=self.dtype)
        for i, u in enumerate(units):
            for k, s in enumerate(batch.units[u]):
                n = len(batch.sequences[s])
                ids[i, k, :n] = torch.tensor(batch.sequences[s])
                coef[i, k, :n] = torch.tensor(batch.coefficients[s], dtype=self.dtype)
        return ids.to(self.device), coef.to(self.device)

    def unit_gradients(self, batch: UnitBatch, units: list[int]) -> torch.Tensor:
        """Flattened gradients of `units`, one row each: [len(units), n_selected]."""
        ids, coef = self._pad_chunk(batch, units)
        grads = vmap(grad(self._unit_loss), in_dims=(None, 0, 0))(self.params, ids, coef)
        return torch.cat([grads[n].reshape(len(units), -1).to(self.dtype) for n in self.names], 1)

    def _gram_block(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, sl] @ y[:, sl].T for sl in self.group_slices]).to(
            "cpu", torch.float64
        )

    def run(
        self,
        batch: UnitBatch,
        sum_weights: torch.Tensor | None = None,
        chunk_size: int = 8,
        max_retained_bytes: int = 2 << 30,
        on_chunk: Callable[[int], None] | None = None,
    ) -> UnitGradients:
        """Gram matrices of all units and the sums ``sum_weights @ grads`` in one or more passes.

        `on_chunk(n_units)` is called after each computed chunk (for progress bars).
        """
        n_units = len(batch.units)
        active = [u for u in range(n_units) if batch.is_active(u)]
        chunks = [active[i : i + chunk_size] for i in range(0, len(active), chunk_size)]
        row_bytes = self.n_selected * torch.finfo(self.dtype).bits // 8
        panel_len = max(1, max_retained_bytes // max(1, chunk_size * row_bytes))
        gram = torch.zeros((len(self.groups), n_units, n_units), dtype=torch.float64)
        sums = None
        if sum_weights is not None:
            sums = torch.zeros((sum_weights.shape[0], self.n_selected), dtype=self.dtype,
                               device=self.device)
            sum_weights = sum_weights.to(self.device, self.dtype)
        nonfinite: list[int] = []
        passes = 0
        for start in range(0, len(chunks), panel_len):
            passes += 1
            panel: list[tuple[list[int], torch.Tensor]] = []
            for ci in range(start, len(chunks)):
                units = chunks[ci]
                x = self.unit_gradients(batch, units)
                if on_chunk is not None:
                    on_chunk(len(units))
                if start == 0:
                    bad = ~torch.isfinite(x).all(1)
                    nonfinite += [units[i] for i in bad.nonzero().flatten().tolist()]
                    if sums is not None:
                        sums += sum_weights[:, units] @ x
                in_panel = ci < start + panel_len
                if in_panel:
                    panel.append((units, x))
                for p_units, p in panel:
                    block = self._gram_block(p, x)
                    gram[:, torch.tensor(p_units)[:, None], torch.tensor(units)[None, :]] = block
                    gram[:, torch.tensor(units)[:, None], torch.tensor(p_units)[None, :]] = (
                        block.transpose(1, 2)
                    )
            if nonfinite:
                raise NonFiniteGradientError(sorted(nonfinite))
        return UnitGradients(
            param_names=self.names,
            param_shapes=self.shapes,
            groups=self.groups,
            group_sizes=[sl.stop - sl.start for sl in self.group_slices],
            gram=gram,
            sums=None if sums is None else sums.cpu(),
            passes=passes,
            chunk_size=chunk_size,
        )
