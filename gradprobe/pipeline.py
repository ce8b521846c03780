"""scan(): the stages in order, and the only place that knows the order.

mix -> rollouts -> rewards -> `gradprobe.api.measure` (advantages, gradients, statistics) -> scan
directory. Each stage is a function over plain data in its own module; this file wires them and
times them. Printing is the caller's: progress goes through a `Progress` object.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gradprobe import artifacts
from gradprobe.advantages import ADVANTAGES
from gradprobe.api import (  # noqa: F401  (available_memory, dominance_verdict, run_statistics: also used from here)
    Progress,
    SilentProgress,
    available_memory,
    check_prompts_per_task,
    dominance_verdict,
    measure,
    run_statistics,
)
from gradprobe.errors import InputWarning, UserInputError
from gradprobe.gradients import INTERVALS
from gradprobe.objective import LOSSES
from gradprobe.rewards import effective_rewards, parse_reward_options


@dataclass
class ScanConfig:
    """Every setting of a scan; saved in scan.json as `config`."""

    model: str
    mix: str | None = None
    rollouts: str | None = None
    out: str = "gradprobe-scan"
    overwrite: bool = False
    task_field: str = "task"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    split: str | None = None
    prompts_per_task: int | None = None
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    rewards: list[str] = field(default_factory=list)
    default_reward: str = "exact"
    advantage: str = "grpo"
    loss: str = "grpo"
    params: list[str] = field(default_factory=lambda: ["all"])
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "auto"
    chunk_size: int | None = None
    max_memory_gib: float | None = None
    checkpoint_activations: bool = False
    intervals: str = "exact"
    sums: str = "auto"
    shard: str = "auto"
    proxy_check: bool = True
    stats: bool = True
    generate_batch_size: int = 16
    task_grads_limit_mb: float = 64.0
    task_grads_seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    adapter: str | None = None
    reward_workers: int = 1
    reward_timeout_s: float = 60.0
    truncate_prompts: bool = False
    allow_weak_sandbox: bool = False


@dataclass
class ScanResult:
    document: dict[str, Any]
    out: Path


def validate(config: ScanConfig) -> None:
    """Reject bad settings before any expensive work."""
    estimator = ADVANTAGES.get(config.advantage)
    LOSSES.get(config.loss)
    if config.rollouts is not None and config.rewards:
        raise UserInputError(
            "--reward does not apply with --rollouts: the rollouts file's reward column is "
            f"used as it is (got --reward {config.rewards[0]})"
        )
    if config.rollouts is None:
        if config.group_size < 1:
            raise UserInputError("--group-size must be at least 1")
        if config.group_size < 2 and estimator.needs_group:
            raise UserInputError(
                f"--group-size 1 with --advantage {config.advantage}: that estimator compares "
                "completions of a prompt; use --group-size 2 or more, or --advantage none"
            )
        if not config.temperature > 0:
            raise UserInputError("--temperature must be positive (sampling needs it)")
        if not 0 < config.top_p <= 1:
            raise UserInputError("--top-p must be in (0, 1]")
    if config.max_new_tokens < 1:
        raise UserInputError("--max-new-tokens must be at least 1")
    if config.reward_workers < 1:
        raise UserInputError("--reward-workers must be at least 1")
    if not config.reward_timeout_s >= 0:
        raise UserInputError("--reward-timeout must be 0 (no limit) or more seconds")
    if config.engine not in ("auto", "hooks", "vmap"):
        raise UserInputError(f"--engine must be auto, hooks or vmap, not {config.engine!r}")
    if config.generate_batch_size < 1:
        raise UserInputError("--generate-batch-size must be at least 1")
    if config.intervals not in INTERVALS:
        raise UserInputError(f"--intervals must be one of {', '.join(INTERVALS)}, not {config.intervals!r}")
    if config.sums not in ("auto", "device", "host"):
        raise UserInputError(f"--sums must be auto, device or host, not {config.sums!r}")
    from gradprobe.distributed.sharded import SHARD_MODES

    if config.shard not in SHARD_MODES:
        raise UserInputError(f"--shard must be one of {', '.join(SHARD_MODES)}, not {config.shard!r}")
    if config.shard in ("sums", "params") and (config.engine == "vmap" or config.checkpoint_activations):
        raise UserInputError(f"--shard {config.shard} runs on the hooks engine; drop --engine vmap and "
                             "--checkpoint-activations, or use --shard none")
    if config.engine == "hooks" and config.checkpoint_activations:
        raise UserInputError("--checkpoint-activations runs on the vmap engine; use --engine auto or vmap")
    if config.chunk_size is not None and config.chunk_size < 1:
        raise UserInputError("--chunk-size must be at least 1")
    if config.max_memory_gib is not None and not config.max_memory_gib > 0:
        raise UserInputError("--max-memory must be a positive number of GiB")
    if not config.task_grads_limit_mb >= 0:
        raise UserInputError("--task-grads-limit must be 0 or more MB (0 always saves a projection)")


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 4)


def scan(config: ScanConfig, progress: Progress | None = None) -> ScanResult:
    """Run a whole scan and write its directory; raises UserInputError for bad input."""
    from gradprobe.gradients.params import select_parameters
    from gradprobe.gradients.stage import StageSettings
    from gradprobe.mix import load_mix, render_prompt, select_prompts
    from gradprobe.mix.spec import task_rewards
    from gradprobe.model_loading import load_model
    from gradprobe.rollouts import encode_prompts, read_rollouts, sample_rollouts
    from gradprobe.scoring import score_rollouts

    from gradprobe import distributed

    progress = progress or SilentProgress()
    validate(config)
    out = Path(config.out)
    session = distributed.current()  # several processes under torchrun; only rank 0 writes
    if session.is_writer:
        artifacts.check_output_dir(out, config.overwrite)
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    mix = None
    sandbox_used = None
    if config.rollouts is None:
        if config.mix is None:
            raise UserInputError("give a MIX file (or --rollouts FILE, or --demo)")
        with _timed(timings, "mix_s"):
            mix = load_mix(Path(config.mix), config.task_field, config.prompt_field, config.answer_field,
                           config.split)
            prompts = select_prompts(mix, config.prompts_per_task, config.seed)
            configured = task_rewards(mix)
            reward_specs = parse_reward_options(config.rewards, mix.tasks, config.default_reward,
                                                configured)
            rewards = effective_rewards(config.rewards, reward_specs, configured)
            reward_specs, sandbox_used = isolate_code_rewards(reward_specs, config.allow_weak_sandbox)
    with _timed(timings, "load_model_s"):
        loaded = load_model(config.model, config.device, config.dtype, config.allow_pickle,
                            config.trust_remote_code, config.adapter)
    model, tokenizer = loaded.model, loaded.tokenizer
    param_names = select_parameters(model, config.params)
    budget = int(config.max_memory_gib * 2**30) if config.max_memory_gib else available_memory(next(model.parameters()).device)
    settings = StageSettings(config.engine, config.temperature, tokenizer.pad_token_id or 0,
                             config.checkpoint_activations, config.chunk_size, intervals=config.intervals,
                             sums=config.sums, shard=config.shard)
    notes: list[str] = []
    if config.rollouts is None:
        if any(isinstance(p.prompt, list) for p in prompts) and not getattr(tokenizer, "chat_template", None):
            _warn(notes, "the tokenizer has no chat template: chat prompts are rendered as plain "
                         "'role: content' lines, which the model was probably not trained on")
        rendered = [render_prompt(tokenizer, p.prompt) for p in prompts]
        encoded = encode_prompts(tokenizer, prompts, rendered, model, config.max_new_tokens,
                                 config.truncate_prompts)
        _check_plan_before_sampling(model, param_names, prompts, encoded, config, settings, budget)
        batches = _generation_share(session, len(prompts), config.generate_batch_size)
        with _timed(timings, "generate_s"), progress.stage("sampling", len(prompts)) as advance:
            rollouts = sample_rollouts(
                model, tokenizer, prompts, rendered, config.group_size, config.max_new_tokens,
                config.temperature, config.top_p, config.seed, config.generate_batch_size, advance,
                encoded, batches,
            )
        with _timed(timings, "rewards_s"), progress.stage("rewards", len(rollouts)) as advance:
            rollouts = score_rollouts(rollouts, reward_specs, advance, config.reward_workers,
                                      config.reward_timeout_s)
        if session.is_distributed:
            from gradprobe.distributed.rollouts import batch_rollout_counts, gather_in_batch_order

            counts = batch_rollout_counts(len(prompts), config.generate_batch_size, config.group_size)
            rollouts = gather_in_batch_order(session, rollouts, batches, counts)
    else:
        with _timed(timings, "rollouts_s"):
            rollouts = read_rollouts(Path(config.rollouts), tokenizer, model)
        check_prompts_per_task(rollouts)
        rewards = {task: {"spec": None, "source": "rollouts file"}
                   for task in dict.fromkeys(r.task for r in rollouts)}
    measurement = measure(
        model, rollouts, advantage=config.advantage, loss=config.loss, params=config.params,
        intervals=config.intervals, engine=config.engine, temperature=config.temperature,
        max_new_tokens=config.max_new_tokens, stats=config.stats, pad_token_id=tokenizer.pad_token_id or 0,
        mix_weights=None if mix is None else mix.weights, sums=config.sums, shard=config.shard, chunk_size=config.chunk_size,
        checkpoint_activations=config.checkpoint_activations, max_memory_bytes=budget,
        proxy_check=config.proxy_check, task_grads_limit_mb=config.task_grads_limit_mb,
        task_grads_seed=config.task_grads_seed,
        task_grads_free_disk_bytes=shutil.disk_usage(out.resolve().parent).free, progress=progress,
    )
    timings.update(measurement.timings)
    if not session.is_writer:  # the others' work is done: rank 0 has every reduction
        return ScanResult(measurement.to_json(), out)
    timings["total_s"] = round(time.perf_counter() - total_start, 4)
    measurement = replace(
        measurement, config=asdict(config), timings=timings, rollouts_source=config.rollouts,
        mix=None if mix is None else mix.describe(),
        model={**measurement.model, "path": str(loaded.path), "fingerprint": loaded.fingerprint,
               "dtype": loaded.dtype, "device": loaded.device},
        extra={"sandbox": sandbox_used, "warnings": notes, "rewards": rewards},
    )
    measurement.write(out, config.overwrite)
    return ScanResult(measurement.to_json(), out)


def _warn(notes: list[str], message: str) -> None:
    """A stated warning: printed by the CLI and kept in scan.json's `warnings`."""
    notes.append(message)
    warnings.warn(message, InputWarning, stacklevel=2)


def isolate_code_rewards(
    rewards: dict[str, Any], allow_weak: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The rewards with the isolation set on each one that runs model-written code, and what
    scan.json records about it (None when no reward runs code).

    bwrap unless it cannot run here; then `UserInputError` with the reason, or the weak guard
    when `allow_weak`. Checked before any model work.
    """
    from dataclasses import replace

    from gradprobe.rewards.composite import as_composite
    from gradprobe.rewards.registry import REWARDS, RUNS_CODE
    from gradprobe.rewards.sandbox import bwrap_problem, check_isolation

    code_runners = {REWARDS.get(name) for name in RUNS_CODE}
    composites = {task: as_composite(reward) for task, reward in rewards.items()}
    users = sorted(task for task, c in composites.items() if any(s.fn in code_runners for _, _, s in c.terms))
    if not users:
        return rewards, None
    problem = bwrap_problem()
    isolation = check_isolation("weak" if allow_weak and problem is not None else "bwrap")
    isolated = {}
    for task, composite in composites.items():
        terms = tuple((name, weight, replace(spec, options={**spec.options, "isolation": isolation})
                       if spec.fn in code_runners else spec) for name, weight, spec in composite.terms)
        isolated[task] = replace(composite, terms=terms)
    return isolated, {"isolation": isolation, "tasks": users,
                      "why_weak": problem if isolation == "weak" else None}


def _generation_share(session: Any, n_prompts: int, batch_size: int) -> list[int] | None:
    """The generation batches this process samples (None: all, one process)."""
    if not session.is_distributed:
        return None
    from gradprobe.distributed.data_parallel import generation_batches

    return generation_batches(-(-n_prompts // batch_size), session)


def _check_plan_before_sampling(model: Any, param_names: list[str], prompts: list[Any], encoded: list[list[int]],
                                config: ScanConfig, settings: Any, budget: int) -> None:
    """Plan the gradient stage for the longest completions `--max-new-tokens` allows before any
    sampling: a scan that cannot fit exits 2 now, not after the rollouts."""
    from gradprobe import distributed
    from gradprobe.gradients.plan import RolloutShape
    from gradprobe.gradients.stage import plan_stage

    if config.engine == "vmap" or config.checkpoint_activations or not prompts:
        return
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.task] = counts.get(p.task, 0) + 1
    shape = RolloutShape(len(counts), max(counts.values()), config.group_size,
                         max(1, max(len(ids) for ids in encoded)), max(1, config.max_new_tokens))
    plan_stage(model, param_names, shape, settings, budget, distributed.current().world)
