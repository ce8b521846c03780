"""scan(): the stages in order, and the only place that knows the order.

mix -> rollouts -> rewards -> `gradprobe.api.measure` (advantages, gradients, statistics) -> scan
directory. Each stage is a function over plain data in its own module; this file wires them and
times them. Printing is the caller's: progress goes through a `Progress` object.
"""

from __future__ import annotations

import shutil
import time
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
from gradprobe.errors import UserInputError
from gradprobe.gradients import INTERVALS
from gradprobe.objective import LOSSES
from gradprobe.rewards import parse_reward_options


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
    proxy_check: bool = True
    stats: bool = True
    generate_batch_size: int = 16
    task_grads_limit_mb: float = 64.0
    task_grads_seed: int = 0
    allow_pickle: bool = False
    trust_remote_code: bool = False
    adapter: str | None = None
    reward_workers: int = 1


@dataclass
class ScanResult:
    document: dict[str, Any]
    out: Path


def validate(config: ScanConfig) -> None:
    """Reject bad settings before any expensive work."""
    estimator = ADVANTAGES.get(config.advantage)
    LOSSES.get(config.loss)
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
    if config.engine not in ("auto", "hooks", "vmap"):
        raise UserInputError(f"--engine must be auto, hooks or vmap, not {config.engine!r}")
    if config.intervals not in INTERVALS:
        raise UserInputError(f"--intervals must be one of {', '.join(INTERVALS)}, not {config.intervals!r}")
    if config.sums not in ("auto", "device", "host"):
        raise UserInputError(f"--sums must be auto, device or host, not {config.sums!r}")
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
    from gradprobe.rollouts import read_rollouts, sample_rollouts
    from gradprobe.scoring import score_rollouts

    progress = progress or SilentProgress()
    validate(config)
    out = Path(config.out)
    artifacts.check_output_dir(out, config.overwrite)
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    mix = None
    if config.rollouts is None:
        if config.mix is None:
            raise UserInputError("give a MIX file (or --rollouts FILE, or --demo)")
        with _timed(timings, "mix_s"):
            mix = load_mix(Path(config.mix), config.task_field, config.prompt_field, config.answer_field,
                           config.split)
            prompts = select_prompts(mix, config.prompts_per_task, config.seed)
            reward_specs = parse_reward_options(config.rewards, mix.tasks, config.default_reward,
                                                task_rewards(mix))
    with _timed(timings, "load_model_s"):
        loaded = load_model(config.model, config.device, config.dtype, config.allow_pickle,
                            config.trust_remote_code, config.adapter)
    model, tokenizer = loaded.model, loaded.tokenizer
    param_names = select_parameters(model, config.params)
    budget = int(config.max_memory_gib * 2**30) if config.max_memory_gib else available_memory(next(model.parameters()).device)
    settings = StageSettings(config.engine, config.temperature, tokenizer.pad_token_id or 0,
                             config.checkpoint_activations, config.chunk_size, intervals=config.intervals,
                             sums=config.sums)
    if config.rollouts is None:
        rendered = [render_prompt(tokenizer, p.prompt) for p in prompts]
        _check_plan_before_sampling(model, param_names, prompts, rendered, tokenizer, config, settings, budget)
        with _timed(timings, "generate_s"), progress.stage("sampling", len(prompts)) as advance:
            rollouts = sample_rollouts(
                model, tokenizer, prompts, rendered, config.group_size, config.max_new_tokens,
                config.temperature, config.top_p, config.seed, config.generate_batch_size, advance,
            )
        with _timed(timings, "rewards_s"), progress.stage("rewards", len(rollouts)) as advance:
            rollouts = score_rollouts(rollouts, reward_specs, advance, config.reward_workers)
    else:
        with _timed(timings, "rollouts_s"):
            rollouts = read_rollouts(Path(config.rollouts), tokenizer, model)
        check_prompts_per_task(rollouts)
    measurement = measure(
        model, rollouts, advantage=config.advantage, loss=config.loss, params=config.params,
        intervals=config.intervals, engine=config.engine, temperature=config.temperature,
        max_new_tokens=config.max_new_tokens, stats=config.stats, pad_token_id=tokenizer.pad_token_id or 0,
        mix_weights=None if mix is None else mix.weights, sums=config.sums, chunk_size=config.chunk_size,
        checkpoint_activations=config.checkpoint_activations, max_memory_bytes=budget,
        proxy_check=config.proxy_check, task_grads_limit_mb=config.task_grads_limit_mb,
        task_grads_seed=config.task_grads_seed,
        task_grads_free_disk_bytes=shutil.disk_usage(out.resolve().parent).free, progress=progress,
    )
    timings.update(measurement.timings)
    timings["total_s"] = round(time.perf_counter() - total_start, 4)
    measurement = replace(
        measurement, config=asdict(config), timings=timings, rollouts_source=config.rollouts,
        mix=None if mix is None else mix.describe(),
        model={**measurement.model, "path": str(loaded.path), "fingerprint": loaded.fingerprint,
               "dtype": loaded.dtype, "device": loaded.device},
    )
    measurement.write(out, config.overwrite)
    return ScanResult(measurement.to_json(), out)


def _check_plan_before_sampling(model: Any, param_names: list[str], prompts: list[Any], rendered: list[str],
                                tokenizer: Any, config: ScanConfig, settings: Any, budget: int) -> None:
    """Plan the gradient stage for the longest completions `--max-new-tokens` allows before any
    sampling: a scan that cannot fit exits 2 now, not after the rollouts."""
    from gradprobe.gradients.plan import RolloutShape
    from gradprobe.gradients.stage import plan_stage
    from gradprobe.rollouts import encode_prompt

    if config.engine == "vmap" or config.checkpoint_activations or not prompts:
        return
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.task] = counts.get(p.task, 0) + 1
    longest = max(len(encode_prompt(tokenizer, p, r)) for p, r in zip(prompts, rendered))
    shape = RolloutShape(len(counts), max(counts.values()), config.group_size, max(1, longest),
                         max(1, config.max_new_tokens))
    plan_stage(model, param_names, shape, settings, budget)
