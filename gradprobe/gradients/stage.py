"""The gradient stage's engine choice: the streaming hooks engine where the model allows, else vmap.

Both engines stream the same reductions (`engine.StreamingReductions`), so they return the same
`UnitGradients` to rounding, with memory flat in the number of prompts. `hooks` runs one forward
and backward per micro-batch, as a training step does; `vmap` differentiates each unit by itself
and serves what hooks cannot: modules the hook rules do not cover. Both run with activation
checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradprobe.distributed.data_parallel import DataParallel
from gradprobe.errors import UserInputError
from gradprobe.gradients import SKETCH_DIM
from gradprobe.gradients.engine import UnitBatch, UnitGradients, halving_on_out_of_memory
from gradprobe.gradients.hooked import HookedEngine, UnsupportedModel
from gradprobe.gradients.layout import UnitLayout
from gradprobe.gradients.plan import RolloutShape, ScanPlan, plan_for_model
from gradprobe.gradients.vmap_engine import GradientEngine

ENGINES = {
    "auto": "hooks when the model allows, else vmap",
    "hooks": "one forward and backward per micro-batch with per-module hooks (fastest)",
    "vmap": "torch.func vmap(grad) per unit (any model)",
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
    sums: str = "auto"
    """Where the task sums live: device, host (pinned memory) or auto (the plan decides)."""
    shard: str = "auto"
    """Under torchrun: none, sums, params or auto (`choose_shard`)."""


def run_gradient_stage(
    model: torch.nn.Module,
    param_names: list[str],
    batch: UnitBatch,
    layout: UnitLayout,
    settings: StageSettings,
    max_memory: int,
    on_chunk: Callable[[int], None] | None = None,
    keep_sums: bool = True,
    parallel: DataParallel | None = None,
) -> tuple[UnitGradients, str | None]:
    """Prompt Grams, task sign sums and (exact intervals) row dots of the selected parameters;
    also why vmap was used, if it was used under `auto`. Raises EngineUnavailable when `hooks`
    was required and cannot run.

    With `parallel` (several processes) this process computes its share of the prompts and the
    reductions are completed across processes after each pass; an out-of-memory error is then
    not retried with smaller micro-batches (the others would wait at a different pass)."""
    reductions = layout.reductions()
    full_batch = batch
    if parallel is not None:
        batch = parallel.local_batch(batch, reductions.prompts)
    row_dots = settings.intervals == "exact"
    sketch_dim = SKETCH_DIM if settings.intervals == "sketch" else None
    fallback = None
    if settings.engine != "vmap":
        try:
            shape = rollout_shape(full_batch, layout)
            devices = 1 if parallel is None else parallel.session.world
            plan = None if shape is None else plan_stage(model, param_names, shape, settings, max_memory, devices)
            hosted = plan is not None and plan.sums_location == "host" and next(model.parameters()).device.type != "cpu"
            engine = HookedEngine(model, param_names, settings.temperature, settings.accumulate_dtype,
                                  settings.pad_token_id, "cpu" if hosted or settings.sums == "host" else None,
                                  sketch_dim=sketch_dim, completion=parallel,
                                  checkpoint_activations=settings.checkpoint_activations)
            tokens = 1 if plan is None else plan.micro_batch_tokens  # None: no prompt carries a loss
            if parallel is not None:  # at most the longest sequence's tokens: one try, no halving
                tokens = max(tokens, max((len(s) for s in batch.sequences), default=1))
                return _without_retry(lambda: engine.run(batch, reductions, tokens, on_chunk, keep_sums, row_dots),
                                      engine.device), None
            return engine.run_adaptive(batch, reductions, tokens, on_chunk,
                                       keep_sums=keep_sums, row_dots=row_dots), None
        except UnsupportedModel as exc:
            if parallel is not None and parallel.lockstep:
                raise EngineUnavailable(f"{exc}; --shard {settings.shard} needs the hooks engine") from None
            if settings.engine == "hooks":
                raise EngineUnavailable(str(exc)) from None
            fallback = str(exc)
    engine = GradientEngine(model, param_names, settings.temperature, settings.accumulate_dtype,
                            settings.pad_token_id, settings.checkpoint_activations, sketch_dim, completion=parallel)
    chunk_size = settings.chunk_size or engine.plan_chunk_size(full_batch, max_memory)
    if parallel is not None:
        size = max(reductions.units_per_prompt, chunk_size - chunk_size % reductions.units_per_prompt)
        return _without_retry(lambda: engine.run(batch, reductions, size, on_chunk, keep_sums, row_dots),
                              engine.device), fallback
    result = engine.run_adaptive(batch, reductions, chunk_size, on_chunk, keep_sums=keep_sums, row_dots=row_dots)
    return result, fallback


def choose_shard(model: torch.nn.Module, param_names: list[str], batch: UnitBatch, layout: UnitLayout,
                 settings: StageSettings, max_memory: int, world: int) -> str:
    """`--shard` resolved for `world` processes: none for one; params for a model already sharded
    with FSDP2 (by the caller's trainer); as asked, or under auto none when the replicated plan
    fits each device (one all-reduce of the sums per pass, no exchange per micro-batch), else
    params. Sharding needs the hooks engine: auto never shards for vmap."""
    if world == 1:
        return "none"
    from torch.distributed.fsdp import FSDPModule

    from gradprobe.gradients.plan import CHECKPOINT_REPLICATED

    already = any(isinstance(m, FSDPModule) for m in model.modules())
    if settings.checkpoint_activations and (already or settings.shard in ("sums", "params")):
        raise UserInputError(CHECKPOINT_REPLICATED)
    if already:
        return "params"
    if settings.shard != "auto":
        return settings.shard
    shape = rollout_shape(batch, layout)
    if settings.engine == "vmap" or settings.checkpoint_activations or shape is None:
        return "none"
    replicated = plan_for_model(model, param_names, shape, max_memory, intervals=settings.intervals,
                                checkpoint_activations=False, sums=settings.sums, devices=world, shard="none")
    return "none" if replicated.fits else "params"


def _without_retry(attempt: Callable[[], UnitGradients], device: torch.device) -> UnitGradients:
    """attempt(), an out-of-memory error as EngineOutOfMemory."""
    return halving_on_out_of_memory(lambda _: attempt(), 1, 1, device)


def rollout_shape(batch: UnitBatch, layout: UnitLayout) -> RolloutShape | None:
    """The planner's view of the rollouts: per prompt its task, prompt length (the tokens before
    the first loss coefficient of its sequences) and its completions' lengths; None when no
    prompt has a completion in a unit (every group degenerate: nothing to differentiate)."""
    tasks, prompt_lens, completion_lens = [], [], []
    for p, units in enumerate(layout.prompt_units()):
        sequences = [s for u in units for s in batch.units[u]]
        if not sequences:
            continue
        lengths = [len(batch.sequences[s]) for s in sequences]
        prompt = min(_loss_start(batch.coefficients[s]) for s in sequences)
        tasks.append(layout.tasks[layout.prompt_task[p]])
        prompt_lens.append(max(1, prompt))
        completion_lens.append([max(1, n - prompt) for n in lengths])
    return RolloutShape.from_lengths(tasks, prompt_lens, completion_lens) if tasks else None


def _loss_start(coefficients: list[float]) -> int:
    return next((i for i, c in enumerate(coefficients) if c != 0.0), len(coefficients))


def plan_stage(model: torch.nn.Module, param_names: list[str], shape: RolloutShape,
               settings: StageSettings, max_memory: int, devices: int = 1) -> ScanPlan:
    """The memory plan of the hooked run; a scan that cannot fit is a one-line error with what
    it needs and what would make it fit (`gradprobe plan` tells more). The scan calls it before
    sampling, with the longest completion `--max-new-tokens` allows, and the stage again with the
    rollouts' real lengths."""
    plan = plan_for_model(model, param_names, shape, max_memory,
                          intervals=settings.intervals, checkpoint_activations=settings.checkpoint_activations,
                          sums=settings.sums, devices=devices, shard=settings.shard)
    if plan.fits:
        return plan
    from gradprobe.views.plan_view import gib

    need = f"it needs {gib(plan.advice.needs_device_memory)} per device" if plan.advice else "it needs more"
    options = [o.flags for o in (plan.advice.options if plan.advice else []) if o.fits]
    raise UserInputError(
        f"the gradient stage does not fit in {gib(max_memory)}: {need}; "
        + (f"options that fit: {'; '.join(options)}" if options else "no single option fits")
        + " (gradprobe plan shows every buffer)")
