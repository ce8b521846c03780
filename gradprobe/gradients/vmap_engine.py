"""The torch.func engine: per-unit gradients with vmap(grad(...)), reduced as they are made.

`hooked` computes the same from one forward and backward per micro-batch and is the default; this
engine differentiates every unit by itself and serves what hooks cannot: activation checkpointing
(units one at a time with recomputed activations) and modules the hook rules do not cover. Its
chunks hold whole prompts; each chunk's unit gradients go into the same `StreamingReductions`
as the hooked engine's and are freed, so memory does not grow with the number of prompts.

Per-unit gradients come from ``vmap(grad(unit_loss))`` over a chunk of units, each unit a padded
[K, L] batch of right-padded sequences (so causal attention never sees padding and no attention
mask is needed). Row dots (exact intervals) recompute every chunk in a second pass, once the sums
are complete.

With ``checkpoint_activations`` the engine trades speed for memory on long completions: torch.func
transforms cannot run through torch.utils.checkpoint, so each unit's gradient is then taken with
plain autograd while every decoder layer recomputes its activations in the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.func import functional_call, grad, vmap

from gradprobe.gradients.engine import (
    PassCompletion,
    Reductions,
    SelectedParameters,
    StreamingReductions,
    UnitBatch,
    UnitGradients,
    activation_bytes_per_token,
    checkpointed_layers,
    halving_on_out_of_memory,
    pad_rows,
    use_eager_attention,
)
from gradprobe.gradients.unit_rules import PerUnit
from gradprobe.objective import token_logprobs


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
        sketch_dim: int | None = None,
        completion: PassCompletion | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.completion = completion
        self.checkpoint_activations = checkpoint_activations
        self.sketch_dim = sketch_dim
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

    def plan_chunk_size(self, batch: UnitBatch, max_memory: int) -> int:
        """Units per chunk (a multiple of the units per prompt, at least one prompt's) so that
        per-unit gradients and activations use about half `max_memory`.

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

    def run_adaptive(self, batch: UnitBatch, reductions: Reductions, chunk_size: int,
                     on_chunk: Callable[[int], None] | None = None,
                     on_retry: Callable[[int], None] | None = None, keep_sums: bool = True,
                     row_dots: bool = True) -> UnitGradients:
        """`run`, halving the chunk size after an out-of-memory error, down to one prompt.
        Results do not depend on the chunk size (to rounding)."""
        k = reductions.units_per_prompt
        return halving_on_out_of_memory(
            lambda size: self.run(batch, reductions, max(k, size - size % k), on_chunk, keep_sums, row_dots),
            chunk_size, k, self.device, on_retry)

    def run(self, batch: UnitBatch, reductions: Reductions, chunk_size: int = 8,
            on_chunk: Callable[[int], None] | None = None, keep_sums: bool = True,
            row_dots: bool = True) -> UnitGradients:
        """Prompt Grams and sums over chunks of whole prompts (at most `chunk_size` units, at
        least one prompt), then with `row_dots` a second pass; `on_chunk(n_units)` after each
        chunk of each pass. Prompts whose units carry no loss are left out."""
        k = reductions.units_per_prompt
        active = [p for p, units in enumerate(reductions.prompts) if any(batch.is_active(u) for u in units)]
        per_chunk = max(1, chunk_size // k)
        chunks = [active[i : i + per_chunk] for i in range(0, len(active), per_chunk)]
        totals = StreamingReductions(self.selected, reductions, sketch_dim=self.sketch_dim,
                                     completion=self.completion)
        for prompt_ids in chunks:
            units = [u for p in prompt_ids for u in reductions.prompts[p]]
            for name, value in self.unit_gradients(batch, units).items():
                part = PerUnit(value)
                totals.add_gram(name, prompt_ids, part)
                totals.add_sums(name, prompt_ids, part)
                if self.sketch_dim is not None:
                    totals.add_sketch(name, prompt_ids, part)
            if on_chunk is not None:
                on_chunk(len(units))
        totals.end_pass_one()
        if row_dots:
            for prompt_ids in chunks:
                units = [u for p in prompt_ids for u in reductions.prompts[p]]
                for name, value in self.unit_gradients(batch, units).items():
                    totals.add_row_dots(name, prompt_ids, PerUnit(value))
                if on_chunk is not None:
                    on_chunk(len(units))
            totals.end_pass_two()
        return totals.result(keep_sums, row_dots, "vmap", 2 if row_dots else 1, per_chunk * k)
