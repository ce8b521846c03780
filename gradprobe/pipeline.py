"""scan(): the stages in order, and the only place that knows the order.

mix -> rollouts -> rewards/advantages -> gradients -> statistics -> scan directory.
Each stage is a function over plain data in its own module; this file wires them, times them,
and assembles scan.json. Printing is the caller's: progress goes through a `Progress` object.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import gradprobe
from gradprobe import artifacts, task_grads
from gradprobe.advantages import ADVANTAGES
from gradprobe.errors import InputWarning, UserInputError
from gradprobe.gradients import INTERVALS
from gradprobe.objective import LOSSES
from gradprobe.caveats import scan_caveats
from gradprobe.rewards import effective_rewards, parse_reward_options
from gradprobe.rollouts import Rollout, rollout_to_json


# A parameter subset is checked against the full model when the model is at most this large.
PROXY_CHECK_MAX_PARAMETERS = 50_000_000


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
    reward_timeout_s: float = 60.0
    truncate_prompts: bool = False
    allow_weak_sandbox: bool = False


class Progress(Protocol):
    """How the pipeline reports long work: a named stage with a total, advanced in steps."""

    def stage(self, name: str, total: int) -> Any: ...


class SilentProgress:
    """A `Progress` that shows nothing (library use and tests)."""

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


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
    from gradprobe.gradients.layout import build_units
    from gradprobe.gradients.params import select_parameters
    from gradprobe.gradients.stage import StageSettings
    from gradprobe.gradients.summary import proxy_fidelity, summarise_gradients
    from gradprobe.mix import load_mix, render_prompt, select_prompts
    from gradprobe.mix.spec import task_rewards
    from gradprobe.model_loading import load_model
    from gradprobe.rollouts import encode_prompts, read_rollouts, sample_rollouts
    from gradprobe.scoring import assign_advantages, score_rollouts

    progress = progress or SilentProgress()
    validate(config)
    out = Path(config.out)
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
                             sums=config.sums)
    notes: list[str] = []
    if config.rollouts is None:
        if any(isinstance(p.prompt, list) for p in prompts) and not getattr(tokenizer, "chat_template", None):
            _warn(notes, "the tokenizer has no chat template: chat prompts are rendered as plain "
                         "'role: content' lines, which the model was probably not trained on")
        rendered = [render_prompt(tokenizer, p.prompt) for p in prompts]
        encoded = encode_prompts(tokenizer, prompts, rendered, model, config.max_new_tokens,
                                 config.truncate_prompts)
        _check_plan_before_sampling(model, param_names, prompts, encoded, config, settings, budget)
        with _timed(timings, "generate_s"), progress.stage("sampling", len(prompts)) as advance:
            rollouts = sample_rollouts(
                model, tokenizer, prompts, rendered, config.group_size, config.max_new_tokens,
                config.temperature, config.top_p, config.seed, config.generate_batch_size, advance,
                encoded,
            )
        with _timed(timings, "rewards_s"), progress.stage("rewards", len(rollouts)) as advance:
            rollouts = score_rollouts(rollouts, reward_specs, advance, config.reward_workers,
                                      config.reward_timeout_s)
    else:
        with _timed(timings, "rollouts_s"):
            rollouts = read_rollouts(Path(config.rollouts), tokenizer, model)
        _check_rollout_tasks(rollouts)
        rewards = {task: {"spec": None, "source": "rollouts file"}
                   for task in dict.fromkeys(r.task for r in rollouts)}
    rollouts = assign_advantages(rollouts, ADVANTAGES.get(config.advantage))

    batch, layout = build_units(rollouts, LOSSES.get(config.loss), config.max_new_tokens,
                                None if mix is None else mix.weights)
    all_names = select_parameters(model, ["all"])  # before the engine freezes every parameter
    passes = 2 if config.intervals == "exact" else 1
    # The engines report whole prompts' units, once per pass.
    active = passes * sum(len(units) for units in layout.prompt_units()
                          if any(batch.is_active(u) for u in units))
    with _timed(timings, "gradients_s"), progress.stage("gradients", active) as advance:
        result, fallback = _gradients(model, param_names, batch, layout, settings, budget, advance)
    summary = summarise_gradients(result, layout)
    document = _scan_document(config, loaded, mix, rollouts, layout, summary, result, timings)
    document["sandbox"] = sandbox_used
    document["warnings"] = notes
    document["rewards"] = rewards
    if fallback:
        document["engine"]["fallback"] = fallback
    if len(param_names) < len(all_names) and config.proxy_check and (
        sum(p.numel() for p in model.parameters()) <= PROXY_CHECK_MAX_PARAMETERS
    ):
        with _timed(timings, "proxy_check_s"):
            full_result, _ = _gradients(model, all_names, batch, layout, settings, budget, None, keep_sums=False)
            full = summarise_gradients(full_result, layout)
        document["proxy_fidelity"] = {
            "params": config.params,
            **proxy_fidelity([summary.tasks[t]["grad_norm"] for t in layout.tasks],
                             [full.tasks[t]["grad_norm"] for t in layout.tasks]),
            "full_norm_ratio": {t: full.tasks[t]["norm_ratio"] for t in layout.tasks},
        }
    if config.stats:
        with _timed(timings, "stats_s"):
            document["stats"] = run_statistics(document["prompts"], summary.task_moments)
        document["verdict"] = dominance_verdict(document["tasks"], document["stats"]["dominance"])
    document["caveats"] = scan_caveats(document["tasks"], document["prompts"], document.get("stats"))
    with _timed(timings, "task_grads_s"):
        saved_grads = task_grads.from_sums(result.paired_sums(), layout.tasks, config.task_grads_limit_mb,
                                           config.task_grads_seed,
                                           free_disk_bytes=shutil.disk_usage(out.resolve().parent).free)
    document["task_grads"] = saved_grads.info
    timings["total_s"] = round(time.perf_counter() - total_start, 4)
    with artifacts.staged_directory(out, config.overwrite) as staging:
        artifacts.write_json(staging / artifacts.SCAN_FILE, document)
        task_grads.write(staging / artifacts.TASK_GRADS_FILE, saved_grads)
        _write_rollouts(staging / artifacts.ROLLOUTS_FILE, rollouts, layout, summary)
    return ScanResult(document, out)


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


def _gradients(model: Any, names: list[str], batch: Any, layout: Any, settings: Any, budget: int,
               advance: Callable[[int], None] | None, keep_sums: bool = True) -> tuple[Any, str | None]:
    """The gradient stage, its failures as one-line user errors."""
    from gradprobe.gradients.engine import EngineOutOfMemory, NonFiniteGradientError
    from gradprobe.gradients.stage import EngineUnavailable, run_gradient_stage

    try:
        return run_gradient_stage(model, names, batch, layout, settings, budget, advance, keep_sums)
    except EngineUnavailable as exc:
        raise UserInputError(f"--engine hooks cannot run here: {exc}; use --engine auto or vmap") from None
    except EngineOutOfMemory as exc:
        raise UserInputError(
            f"out of memory even with one prompt per chunk ({exc}); select fewer parameters "
            "(--params last-block), or lower --max-new-tokens or --group-size"
        ) from None
    except NonFiniteGradientError as exc:
        bad = sorted({layout.tasks[layout.prompt_task[layout.unit_prompt[u]]] for u in exc.units})
        raise UserInputError(
            f"non-finite gradients in task(s) {', '.join(bad)}; try --dtype float32 or "
            "check those tasks' completions"
        ) from None


def available_memory(device: Any) -> int:
    """Free bytes on the device: CUDA's free memory, or the host's available RAM."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def run_statistics(rows: list[dict[str, Any]], task_moments: dict[str, Any]) -> dict[str, Any]:
    """The statistics stage over the per-prompt rows of scan.json and the gradient stage's
    per-task moments (docs/metrics.md, "Statistics")."""
    from gradprobe.stats import PromptTable, compute_stats

    def column(key: str) -> np.ndarray:
        return np.array([row[key] for row in rows], dtype=float)

    table = PromptTable(
        task=[row["task"] for row in rows],
        grad_norm=column("prompt_grad_norm"),
        mean_reward=column("mean_reward"),
        reward_std=column("reward_std"),
        mean_abs_advantage=column("mean_abs_advantage"),
        mean_completion_length=column("mean_completion_length"),
        prompt_length=column("prompt_length"),
        degenerate=np.array([row["zero_advantage"] for row in rows], dtype=bool),
        prompt_id=[str(row["prompt_id"]) for row in rows],
    )
    return compute_stats(table, task_moments)


def _check_plan_before_sampling(model: Any, param_names: list[str], prompts: list[Any], encoded: list[list[int]],
                                config: ScanConfig, settings: Any, budget: int) -> None:
    """Plan the gradient stage for the longest completions `--max-new-tokens` allows before any
    sampling: a scan that cannot fit exits 2 now, not after the rollouts."""
    from gradprobe.gradients.plan import RolloutShape
    from gradprobe.gradients.stage import plan_stage

    if config.engine == "vmap" or config.checkpoint_activations or not prompts:
        return
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.task] = counts.get(p.task, 0) + 1
    shape = RolloutShape(len(counts), max(counts.values()), config.group_size,
                         max(1, max(len(ids) for ids in encoded)), max(1, config.max_new_tokens))
    plan_stage(model, param_names, shape, settings, budget)


def _check_rollout_tasks(rollouts: list[Rollout]) -> None:
    prompts: dict[str, set[str]] = {}
    for r in rollouts:
        prompts.setdefault(r.task, set()).add(r.prompt_id)
    for task, ids in prompts.items():
        if len(ids) < 2:
            raise UserInputError(
                f"task {task!r} has {len(ids)} prompt in the rollouts; every task needs at least 2"
            )


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _prompt_rows(rollouts: list[Rollout], layout: Any, summary: Any) -> list[dict[str, Any]]:
    """One row per prompt: its gradient norm and the covariates the statistics test against."""
    rows = []
    for p, (task, prompt_id) in enumerate(layout.prompt_keys):
        group = [rollouts[i] for i in layout.prompt_rollouts[p]]
        rewards = np.array([r.reward for r in group], dtype=float)
        rows.append({
            "task": task,
            "prompt_id": prompt_id,
            "prompt_grad_norm": float(summary.prompt_grad_norm[p]),
            "n_rollouts": len(group),
            "mean_reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "mean_abs_advantage": _mean([abs(r.advantage) for r in group]),
            "mean_completion_length": _mean([r.n_tokens for r in group]),
            "prompt_length": len(group[0].prompt_token_ids),
            "degenerate": bool(np.all(rewards == rewards[0])),
            "zero_advantage": all(r.advantage == 0 for r in group),
        })
    return rows


def _task_table(rows: list[dict[str, Any]], summary: Any, layout: Any) -> dict[str, dict[str, Any]]:
    """Per task: rollout statistics beside its gradient figures (scan.json `tasks`)."""
    table = {}
    for task in layout.tasks:
        mine = [row for row in rows if row["task"] == task]
        table[task] = {
            "n_prompts": len(mine),
            "n_rollouts": sum(row["n_rollouts"] for row in mine),
            "mean_reward": float(np.average([row["mean_reward"] for row in mine],
                                            weights=[row["n_rollouts"] for row in mine])),
            "reward_std": _mean([row["reward_std"] for row in mine]),
            "degenerate_groups": sum(row["degenerate"] for row in mine),
            "degenerate_fraction": sum(row["degenerate"] for row in mine) / len(mine),
            "mean_abs_advantage": _mean([row["mean_abs_advantage"] for row in mine]),
            "mean_completion_length": _mean([row["mean_completion_length"] for row in mine]),
            **summary.tasks[task],
        }
    return table


def dominance_verdict(tasks: dict[str, dict[str, Any]], dominance: dict[str, Any] | None = None) -> str:
    """The headline: the statistics' dominance sentence (gradprobe.stats.dominance_sentence),
    with the dominant task's share of the update; without statistics, the largest norm untested."""
    from gradprobe.stats import dominance_sentence

    norms = {t: v["grad_norm"] for t, v in tasks.items() if v["grad_norm"]}
    if len(tasks) < 2:
        return "One task only: nothing to compare."
    if len(norms) < 2:
        return "Fewer than two tasks have a nonzero gradient: no imbalance to measure."
    if dominance is None:
        top, low = max(norms, key=norms.get), min(norms, key=norms.get)
        return (f"{top} has the largest gradient norm, {norms[top] / norms[low]:.1f}x that of "
                f"{low}; untested (statistics off).")
    sentence = dominance_sentence(dominance)
    share = tasks[dominance["dominant"]]["share"] if dominance["dominant"] else None
    if share is not None:
        sentence = sentence[:-1] + f"; it takes {share:.0%} of the mixed update."
    return sentence


def _scan_document(config, loaded, mix, rollouts, layout, summary, result, timings) -> dict[str, Any]:
    import datasets
    import torch
    import transformers

    from gradprobe.intervals import U_METHOD

    rows = _prompt_rows(rollouts, layout, summary)
    tasks = _task_table(rows, summary, layout)
    estimator = ADVANTAGES.get(config.advantage)
    return {
        "schema_version": artifacts.SCHEMA_VERSION,
        "gradprobe_version": gradprobe.__version__,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "model": {
            "path": str(loaded.path),
            "fingerprint": loaded.fingerprint,
            "dtype": loaded.dtype,
            "device": loaded.device,
            "n_parameters": sum(p.numel() for p in loaded.model.parameters()),
            "n_selected_parameters": int(sum(result.group_sizes)),
        },
        "mix": None if mix is None else mix.describe(),
        "rollouts_source": config.rollouts,
        "advantage": {"name": config.advantage, "formula": estimator.convention},
        "loss": {"name": config.loss, "formula": LOSSES.get(config.loss).formula,
                 "mix_weight_by": LOSSES.get(config.loss).weight_by},
        "tasks": tasks,
        "cosine": {"tasks": layout.tasks, "matrix": summary.cosine},
        "cosine_unbiased": {"tasks": layout.tasks, "matrix": summary.cosine_unbiased},
        "mixed": summary.mixed,
        "modules": summary.modules,
        "estimators": {"grad_sq_norm_unbiased_ci": U_METHOD if config.intervals != "none" else
                       "none (--intervals none)"},
        "verdict": dominance_verdict(tasks),
        "prompts": rows,
        "engine": {"name": result.engine, "chunk_size": result.micro_batch, "passes": result.passes,
                   "intervals": config.intervals, "sums_device": result.sums_device},
        "timings": timings,
    }


def _write_rollouts(path: Path, rollouts: list[Rollout], layout: Any, summary: Any) -> None:
    prompt_norm = {key: float(summary.prompt_grad_norm[p]) for p, key in enumerate(layout.prompt_keys)}
    lines = [rollout_to_json(r, {"prompt_grad_norm": prompt_norm[(r.task, r.prompt_id)]})
             for r in rollouts]
    artifacts.write_text(path, "\n".join(lines) + "\n")
