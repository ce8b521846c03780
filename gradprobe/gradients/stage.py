"""The gradient stage's engine choice: hooks when the model allows, else vmap.

Both engines return the same `UnitGradients` (Grams within each task, task-gradient sums) to
rounding. `hooks` runs one forward and backward per micro-batch, as a training step does; `vmap`
differentiates each unit by itself and is what remains when hooks cannot be used: activation
checkpointing, a module the hook rules do not cover, or a task whose unit gradients must be
recomputed because they cannot all be kept in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradprobe.gradients.engine import GradientEngine, UnitBatch, UnitGradients
from gradprobe.gradients.hooked import HookedEngine, NeedsRecomputation, UnsupportedModel
from gradprobe.gradients.layout import UnitLayout

ENGINES = {
    "auto": "hooks when the model and memory allow, else vmap",
    "hooks": "one forward and backward per micro-batch with per-module hooks (fastest)",
    "vmap": "torch.func vmap(grad) per unit (any model; recomputes when memory is short)",
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
    """Per-task Grams and task sums of the selected parameters; also why vmap was used, if it
    was used under `auto`. Raises EngineUnavailable when `hooks` was required and cannot run."""
    blocks, sums = layout.task_units(), layout.task_matrix()
    fallback = None
    if settings.engine != "vmap":
        try:
            if settings.checkpoint_activations:
                raise UnsupportedModel("activation checkpointing runs on the vmap engine")
            engine = HookedEngine(model, param_names, settings.temperature, settings.accumulate_dtype,
                                  settings.pad_token_id)
            # run() plans first and raises NeedsRecomputation before any work when the plan cannot fit.
            return engine.run_adaptive(batch, blocks, sums, engine.default_max_tokens(max_memory),
                                       max_memory // 3, on_chunk, keep_sums=keep_sums), None
        except (UnsupportedModel, NeedsRecomputation) as exc:
            if settings.engine == "hooks":
                raise EngineUnavailable(str(exc)) from None
            fallback = str(exc)
    engine = GradientEngine(model, param_names, settings.temperature, settings.accumulate_dtype,
                            settings.pad_token_id, settings.checkpoint_activations)
    chunk_size = settings.chunk_size or engine.plan_chunk_size(batch, max_memory)
    result = engine.run_adaptive(batch, blocks, sums, chunk_size, max_memory // 3, on_chunk,
                                 keep_sums=keep_sums)
    return result, fallback
