"""The gradient stage's engine choice: the streaming hooks engine where the model allows, else vmap.

Both engines stream the same reductions (`engine.StreamingReductions`), so they return the same
`UnitGradients` to rounding, with memory flat in the number of prompts. `hooks` runs one forward
and backward per micro-batch, as a training step does; `vmap` differentiates each unit by itself
and serves what hooks cannot: activation checkpointing, and modules the hook rules do not cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradprobe.gradients.engine import UnitBatch, UnitGradients
from gradprobe.gradients.hooked import HookedEngine, UnsupportedModel
from gradprobe.gradients.layout import UnitLayout
from gradprobe.gradients.vmap_engine import GradientEngine

ENGINES = {
    "auto": "hooks when the model allows, else vmap",
    "hooks": "one forward and backward per micro-batch with per-module hooks (fastest)",
    "vmap": "torch.func vmap(grad) per unit (any model; activation checkpointing)",
}


class EngineUnavailable(RuntimeError):
    """`--engine hooks` was asked for and cannot run (the message says why)."""


@dataclass
class StageSettings:
    engine: str = "auto"
    temperature: float = 1.0
    pad_token_id: int = 0
    checkpoint_activations: bool = False
    chunk_size: int | None = None
    """Units per vmapped call (vmap engine); planned from memory when None."""
    accumulate_dtype: torch.dtype = torch.float32
    intervals: str = "exact"
    sums_device: str | None = None
    """Where the task sums live: None for the model's device, "cpu" for host memory."""


def run_gradient_stage(
    model: torch.nn.Module,
    param_names: list[str],
    batch: UnitBatch,
    layout: UnitLayout,
    settings: StageSettings,
    max_memory: int,
    on_chunk: Callable[[int], None] | None = None,
    keep_sums: bool = True,
) -> tuple[UnitGradients, str | None]:
    """Prompt Grams, task sign sums and (exact intervals) row dots of the selected parameters;
    also why vmap was used, if it was used under `auto`. Raises EngineUnavailable when `hooks`
    was required and cannot run."""
    reductions = layout.reductions()
    row_dots = settings.intervals == "exact"
    fallback = None
    if settings.engine != "vmap":
        try:
            if settings.checkpoint_activations:
                raise UnsupportedModel("activation checkpointing runs on the vmap engine")
            engine = HookedEngine(model, param_names, settings.temperature, settings.accumulate_dtype,
                                  settings.pad_token_id, settings.sums_device)
            return engine.run_adaptive(batch, reductions, engine.default_max_tokens(max_memory), on_chunk,
                                       keep_sums=keep_sums, row_dots=row_dots), None
        except UnsupportedModel as exc:
            if settings.engine == "hooks":
                raise EngineUnavailable(str(exc)) from None
            fallback = str(exc)
    engine = GradientEngine(model, param_names, settings.temperature, settings.accumulate_dtype,
                            settings.pad_token_id, settings.checkpoint_activations)
    chunk_size = settings.chunk_size or engine.plan_chunk_size(batch, max_memory)
    result = engine.run_adaptive(batch, reductions, chunk_size, on_chunk, keep_sums=keep_sums, row_dots=row_dots)
    return result, fallback
