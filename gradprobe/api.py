"""gradprobe.measure: every per-task gradient figure of a scan, for rollouts already in hand.

The CLI's scan samples (or reads) rollouts and scores them, then calls `measure`; a training
callback calls it on one step's batch; `measure_tensors` takes a trainer's padded batch with its
loss's per-token coefficients instead and shares the path from the engine's units on. The result
carries the figures under the names scan.json uses, and writes a scan directory
(`Measurement.write`) that `gradprobe report` and `compare` read. The model is left as it was
found (`gradprobe.model_state`).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gradprobe import artifacts
from gradprobe.advantages import ADVANTAGES
from gradprobe.errors import UserInputError
from gradprobe.gradients import INTERVALS
from gradprobe.objective import LOSSES
from gradprobe.rollouts import Rollout, rollout_to_json

GIVEN_ADVANTAGE = "given"
"""`advantage=` value that keeps each record's own advantage (as a trainer computed it)."""

# A parameter subset is checked against the full model when the model is at most this large.
PROXY_CHECK_MAX_PARAMETERS = 50_000_000

RolloutRecord = Rollout | Mapping[str, Any]


class Progress(Protocol):
    """How long work is reported: a named stage with a total, advanced in steps."""

    def stage(self, name: str, total: int) -> Any: ...


class SilentProgress:
    """A `Progress` that shows nothing (library use and tests)."""

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda n: None


@dataclass
class Measurement:
    """The figures of one measurement, under scan.json's names (docs/metrics.md)."""

    tasks: dict[str, dict[str, Any]]
    """Per task: rollout statistics, grad_norm, grad_sq_norm, share, grad_sq_norm_unbiased and
    its _se and _ci, norm_ratio, noise figures, the positive/negative split."""
    cosine: dict[str, Any]
    cosine_unbiased: dict[str, Any]
    mixed: dict[str, float]
    modules: dict[str, dict[str, Any]]
    prompts: list[dict[str, Any]]
    verdict: str
    stats: dict[str, Any] | None
    advantage: dict[str, Any]
    loss: dict[str, Any]
    estimators: dict[str, Any]
    engine: dict[str, Any]
    model: dict[str, Any]
    config: dict[str, Any]
    rollouts: list[Rollout]
    """The measured rollouts, with the advantages used."""
    timings: dict[str, float]
    proxy_fidelity: dict[str, Any] | None = None
    task_grads: Any = None
    """The saved task gradients (`gradprobe.task_grads.TaskGradients`), when asked for."""
    mix: dict[str, Any] | None = None
    rollouts_source: str | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    caveats: list[dict[str, Any]] = field(default_factory=list)
    """What to keep in mind reading the figures (`gradprobe.caveats.scan_caveats`)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Sections a caller adds to scan.json (the scan: sandbox, warnings, rewards)."""

    @property
    def seconds(self) -> float:
        return self.timings.get("measure_s", 0.0)

    def grad_norms(self) -> dict[str, float | None]:
        return {task: figures["grad_norm"] for task, figures in self.tasks.items()}

    def cosine_of(self, a: str, b: str) -> float | None:
        names = self.cosine["tasks"]
        return self.cosine["matrix"][names.index(a)][names.index(b)]

    def to_json(self) -> dict[str, Any]:
        """The scan.json document (schema gradprobe/schema/scan.schema.json)."""
        import datasets
        import transformers

        import gradprobe

        document: dict[str, Any] = {
            "schema_version": artifacts.SCHEMA_VERSION,
            "gradprobe_version": gradprobe.__version__,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "datasets": datasets.__version__},
            "created": self.created,
            "config": self.config,
            "model": self.model,
            "mix": self.mix,
            "rollouts_source": self.rollouts_source,
            "advantage": self.advantage,
            "loss": self.loss,
            "tasks": self.tasks,
            "cosine": self.cosine,
            "cosine_unbiased": self.cosine_unbiased,
            "mixed": self.mixed,
            "modules": self.modules,
            "estimators": self.estimators,
            "verdict": self.verdict,
            "prompts": self.prompts,
            "engine": self.engine,
            "timings": self.timings,
        }
        if self.proxy_fidelity is not None:
            document["proxy_fidelity"] = self.proxy_fidelity
        if self.stats is not None:
            document["stats"] = self.stats
        document["caveats"] = self.caveats
        if self.task_grads is not None:
            document["task_grads"] = self.task_grads.info
        document.update(self.extra)
        return document

    def write(self, scan_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a scan directory (scan.json, rollouts.jsonl, task gradients when kept)
        atomically; `gradprobe report DIR` shows it."""
        from gradprobe import task_grads

        out = Path(scan_dir)
        artifacts.check_output_dir(out, overwrite)
        with artifacts.staged_directory(out, overwrite) as staging:
            artifacts.write_json(staging / artifacts.SCAN_FILE, self.to_json())
            if self.task_grads is not None:
                task_grads.write(staging / artifacts.TASK_GRADS_FILE, self.task_grads)
            norms = {(row["task"], str(row["prompt_id"])): row["prompt_grad_norm"] for row in self.prompts}
            lines = [rollout_to_json(r, {"prompt_grad_norm": norms[(r.task, r.prompt_id)]}) for r in self.rollouts]
            artifacts.write_text(staging / artifacts.ROLLOUTS_FILE, "\n".join(lines) + "\n")
        return out


def measure(
    model: torch.nn.Module,
    rollouts: Iterable[RolloutRecord],
    *,
    advantage: str = "grpo",
    loss: str = "grpo",
    params: Sequence[str] = ("all",),
    intervals: str = "exact",
    engine: str = "auto",
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    stats: bool = True,
    pad_token_id: int | None = None,
    mix_weights: Mapping[str, float] | None = None,
    sums: str = "auto",
    shard: str = "auto",
    chunk_size: int | None = None,
    checkpoint_activations: bool = False,
    max_memory_bytes: int | None = None,
    proxy_check: bool = False,
    task_grads_limit_mb: float | None = None,
    task_grads_seed: int = 0,
    task_grads_free_disk_bytes: int | None = None,
    progress: Progress | None = None,
) -> Measurement:
    """Per-task gradient figures of `model` on scored rollouts, as `gradprobe scan` reports them.

    `rollouts`: `gradprobe.rollouts.Rollout`s or dicts with task, prompt_id, prompt_token_ids,
    completion_token_ids, reward (and advantage when `advantage="given"`); a prompt's group is its
    (task, prompt_id). `advantage`: an estimator name (grpo, dr_grpo, rloo, none) applied per
    group, or "given". `loss`: grpo, bnpo, dapo, dr_grpo or rloo (`max_new_tokens` is dr_grpo's L_max;
    default the longest completion). `temperature` divides the logits as the trainer's loss does.
    `task_grads_limit_mb` keeps the task gradients for `write` (exact up to that size, else a
    count sketch); None keeps none. `shard` (under torchrun, docs/engine.md): none, sums, params
    (the model is sharded in place with FSDP2 `fully_shard` unless it already is) or auto.
    Raises UserInputError for bad input; the model's modes,
    flags, gradients, attention implementation and the random number generators are restored.
    """
    from gradprobe.model_state import preserved_model_state

    from gradprobe.gradients.layout import build_units

    check_settings(advantage, loss, engine, intervals, sums, shard)
    records = assign_advantage(to_rollouts(rollouts), advantage)
    start = time.perf_counter()
    longest = max(r.n_tokens for r in records)
    batch, layout = build_units(records, LOSSES.get(loss), max_new_tokens or longest, mix_weights)
    described = {
        "advantage": _advantage_info(advantage),
        "loss": {"name": loss, "formula": LOSSES.get(loss).formula, "mix_weight_by": LOSSES.get(loss).weight_by},
        "config": {"advantage": advantage, "loss": loss, "params": list(params), "intervals": intervals,
                   "engine": engine, "temperature": temperature, "max_new_tokens": max_new_tokens,
                   "stats": stats},
    }
    with preserved_model_state(model):
        measurement = _measure(model, records, batch, layout, described, list(params), intervals, engine,
                               temperature, stats, pad_token_id, sums, shard, chunk_size, checkpoint_activations,
                               max_memory_bytes, proxy_check, task_grads_limit_mb, task_grads_seed,
                               task_grads_free_disk_bytes, progress or SilentProgress())
    measurement.timings["measure_s"] = round(time.perf_counter() - start, 4)
    return measurement


COEFFICIENTS = "coefficients"
"""scan.json `advantage.name` and `loss.name` of a measurement from `measure_tensors`."""


def measure_tensors(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    tasks: Sequence[str],
    groups: Sequence[Any],
    attention_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    rewards: Sequence[float] | torch.Tensor | None = None,
    task_weights: Mapping[str, float] | None = None,
    params: Sequence[str] = ("all",),
    intervals: str = "exact",
    engine: str = "auto",
    temperature: float = 1.0,
    stats: bool = True,
    pad_token_id: int | None = None,
    sums: str = "auto",
    shard: str = "auto",
    chunk_size: int | None = None,
    checkpoint_activations: bool = False,
    max_memory_bytes: int | None = None,
    proxy_check: bool = False,
    task_grads_limit_mb: float | None = None,
    task_grads_seed: int = 0,
    task_grads_free_disk_bytes: int | None = None,
    progress: Progress | None = None,
) -> Measurement:
    """`measure` for a trainer's padded batch with the loss's per-token coefficients.

    `input_ids` [N, L]; `coefficients` [N, L] float, c_ij = dL/dlog pi(input_ids[i, j] |
    input_ids[i, <j]) of the trainer's loss L (advantage and aggregation included: for GRPO's
    loss c_ij = -A_i / (N n_i) on completion tokens), zero on prompt and padding tokens;
    `tasks` and `groups` N labels: row i's task and prompt group (a group lies in one task).
    `attention_mask` [N, L] (default all ones) marks each row's tokens, one contiguous run
    (left and right padding are dropped; log pi is that of the unpadded sequence);
    `completion_mask` [N, L] the completion tokens (default: each row's attended tokens from its
    first nonzero coefficient on), recorded only. `rewards`: N rewards, recorded (mean_reward,
    degenerate groups, statistics); None leaves the reward figures null.

    With w_t = `task_weights[t]` (default 1 for every task), the task gradient is

        g_t = (1/w_t) grad sum_{i in t} sum_j c_ij log pi_ij,

    and the mixed gradient g = sum_t w_t g_t = grad sum_ij c_ij log pi_ij is the batch's, so
    shares are each task's part of the batch's update whatever w. Pass the tasks' weights in
    the trainer's loss (L = sum_t w_t L_t) to get g_t = grad L_t, the task gradient a scan
    reports. Row i is in its prompt's positive unit when A_i = -sum_j c_ij >= 0, else in the
    negative one (per-token coefficients of mixed sign split by sequence, not by token); rows
    with no nonzero coefficient belong to neither. docs/metrics.md, "Coefficients given
    directly". Other settings as in `measure`; raises UserInputError for bad input.
    """
    from gradprobe.gradients.layout import build_coefficient_units
    from gradprobe.model_state import preserved_model_state

    check_settings(None, None, engine, intervals, sums, shard)
    records, token_coefficients = _tensor_rollouts(input_ids, coefficients, tasks, groups, attention_mask,
                                                   completion_mask, rewards)
    if stats:
        check_prompts_per_task(records)
    task_order = list(dict.fromkeys(r.task for r in records))
    weights = None if task_weights is None else _task_weight_vector(task_weights, task_order)
    start = time.perf_counter()
    batch, layout = build_coefficient_units(records, token_coefficients, weights)
    given = "given" if task_weights is not None else "1 for every task"
    described = {
        "advantage": {"name": COEFFICIENTS,
                      "formula": "A_i = -sum_j c_ij of the given per-token coefficients c_ij = dL/dlog pi_ij"},
        "loss": {"name": COEFFICIENTS, "formula": "L_t = (1/w_t) sum_{i in t} sum_j c_ij log pi_ij",
                 "mix_weight_by": f"task_weights ({given})"},
        "config": {"advantage": COEFFICIENTS, "loss": COEFFICIENTS, "params": list(params),
                   "intervals": intervals, "engine": engine, "temperature": temperature,
                   "max_new_tokens": None, "stats": stats,
                   "task_weights": None if task_weights is None else dict(zip(task_order, weights.tolist()))},
    }
    with preserved_model_state(model):
        measurement = _measure(model, records, batch, layout, described, list(params), intervals, engine,
                               temperature, stats, pad_token_id, sums, shard, chunk_size, checkpoint_activations,
                               max_memory_bytes, proxy_check, task_grads_limit_mb, task_grads_seed,
                               task_grads_free_disk_bytes, progress or SilentProgress())
    measurement.timings["measure_s"] = round(time.perf_counter() - start, 4)
    return measurement


def _as_2d(name: str, value: Any, shape: tuple[int, ...] | None) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().cpu()
    if tensor.dim() != 2 or (shape is not None and tuple(tensor.shape) != shape):
        want = "[N, L]" if shape is None else f"{list(shape)} like input_ids"
        raise UserInputError(f"{name} must be a 2-D tensor {want}, not shape {list(tensor.shape)}")
    return tensor


def _labels(name: str, values: Any, n: int) -> list[str]:
    labels = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(labels) != n:
        raise UserInputError(f"{name} has {len(labels)} entries; input_ids has {n} rows")
    return [str(v) for v in labels]


def _tensor_rollouts(input_ids: Any, coefficients: Any, tasks: Sequence[str], groups: Sequence[Any],
                     attention_mask: Any, completion_mask: Any,
                     rewards: Any) -> tuple[list[Rollout], list[list[float]]]:
    """Rows of a padded batch as Rollouts (padding dropped) and each row's coefficients over its
    kept tokens; every check of `measure_tensors` input, as one-line UserInputErrors."""
    ids = _as_2d("input_ids", input_ids, None)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UserInputError(f"input_ids must hold integer token ids, not {ids.dtype}")
    shape = tuple(ids.shape)
    n = shape[0]
    if n == 0:
        raise UserInputError("no rows to measure: input_ids has 0 rows")
    coef = _as_2d("coefficients", coefficients, shape).double()
    if not torch.isfinite(coef).all():
        row = int((~torch.isfinite(coef)).any(1).nonzero()[0])
        raise UserInputError(f"coefficients of row {row} are not all finite (NaN or inf)")
    mask = torch.ones(shape, dtype=torch.bool) if attention_mask is None else _mask("attention_mask",
                                                                                    attention_mask, shape)
    done = None if completion_mask is None else _mask("completion_mask", completion_mask, shape)
    task_of, group_of = _labels("tasks", tasks, n), _labels("groups", groups, n)
    reward = None
    if rewards is not None:
        reward = [float(r) for r in (rewards.tolist() if isinstance(rewards, torch.Tensor) else rewards)]
        if len(reward) != n:
            raise UserInputError(f"rewards has {len(reward)} entries; input_ids has {n} rows")
        bad = [i for i, r in enumerate(reward) if not np.isfinite(r)]
        if bad:
            raise UserInputError(f"reward of row {bad[0]} is not finite ({reward[bad[0]]})")
    group_task: dict[str, str] = {}
    for i, (task, group) in enumerate(zip(task_of, group_of)):
        if group_task.setdefault(group, task) != task:
            raise UserInputError(
                f"group {group!r} spans tasks {group_task[group]!r} and {task!r} (row {i}); "
                "a prompt group lies in one task"
            )
    records, token_coefficients, samples = [], [], {}
    for i in range(n):
        kept = mask[i].nonzero().flatten()
        if len(kept) == 0:
            raise UserInputError(f"row {i} has no attended token (attention_mask all 0)")
        first, last = int(kept[0]), int(kept[-1])
        if len(kept) != last - first + 1:
            raise UserInputError(f"row {i}: attention_mask must mark one contiguous run of tokens")
        outside = coef[i].clone()
        outside[first + 1:last + 1] = 0.0  # the first kept token has no log pi: no coefficient either
        if (outside != 0).any():
            raise UserInputError(f"row {i} has nonzero coefficients on padding or its first token; "
                                 "coefficients must be 0 there")
        if done is not None and (coef[i][~done[i]] != 0).any():
            raise UserInputError(f"row {i} has nonzero coefficients outside completion_mask")
        tokens = ids[i, first:last + 1].tolist()
        row = coef[i, first:last + 1].tolist()
        nonzero = [j for j, c in enumerate(row) if c != 0.0]
        if done is not None:
            marked = done[i, first:last + 1].nonzero().flatten()
            split = int(marked[0]) if len(marked) else len(tokens)
        else:
            split = nonzero[0] if nonzero else len(tokens)
        sample = samples[(task_of[i], group_of[i])] = samples.get((task_of[i], group_of[i]), -1) + 1
        records.append(Rollout(
            task=task_of[i], prompt_id=group_of[i], sample=sample, prompt="", completion="",
            prompt_token_ids=tokens[:split], completion_token_ids=tokens[split:],
            reward=None if reward is None else reward[i], advantage=-float(sum(row)),
        ))
        token_coefficients.append(row)
    return records, token_coefficients


def _mask(name: str, value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = _as_2d(name, value, shape)
    if not ((tensor == 0) | (tensor == 1)).all():
        raise UserInputError(f"{name} must hold only 0 and 1")
    return tensor.bool()


def _task_weight_vector(task_weights: Mapping[str, float], tasks: list[str]) -> np.ndarray:
    """w_t in `tasks` order: positive and finite, one for every task of the batch and no other."""
    unknown = sorted(set(map(str, task_weights)) - set(tasks))
    if unknown:
        raise UserInputError(f"task_weights names task(s) not in the batch: {', '.join(unknown)}")
    weights = {str(k): v for k, v in task_weights.items()}
    missing = [t for t in tasks if t not in weights]
    if missing:
        raise UserInputError(f"task_weights lacks task(s) {', '.join(missing)}; give every task a weight")
    vector = np.array([float(weights[t]) for t in tasks])
    if not (np.isfinite(vector) & (vector > 0)).all():
        raise UserInputError("task_weights must be positive finite numbers")
    return vector


def check_settings(advantage: str | None, loss: str | None, engine: str, intervals: str,
                   sums: str = "auto", shard: str = "auto") -> None:
    """UserInputError for an unknown estimator, loss, engine, intervals, sums or shard setting (None:
    no estimator or loss to check, as with coefficients given directly)."""
    if advantage is not None and advantage != GIVEN_ADVANTAGE:
        ADVANTAGES.get(advantage)
    if loss is not None:
        LOSSES.get(loss)
    if engine not in ("auto", "hooks", "vmap"):
        raise UserInputError(f"engine must be auto, hooks or vmap, not {engine!r}")
    if intervals not in INTERVALS:
        raise UserInputError(f"intervals must be one of {', '.join(INTERVALS)}, not {intervals!r}")
    if sums not in ("auto", "device", "host"):
        raise UserInputError(f"sums must be auto, device or host, not {sums!r}")
    from gradprobe.distributed.sharded import SHARD_MODES

    if shard not in SHARD_MODES:
        raise UserInputError(f"shard must be one of {', '.join(SHARD_MODES)}, not {shard!r}")


def to_rollouts(records: Iterable[RolloutRecord]) -> list[Rollout]:
    """Rollouts from `Rollout`s or plain dicts (task, prompt_id, prompt_token_ids,
    completion_token_ids, reward; optional advantage, sample, prompt, completion)."""
    out = []
    for i, record in enumerate(records):
        out.append(record if isinstance(record, Rollout) else _rollout_of(i, record))
    if not out:
        raise UserInputError("no rollouts to measure")
    return out


def _rollout_of(i: int, record: Mapping[str, Any]) -> Rollout:
    required = ("task", "prompt_id", "prompt_token_ids", "completion_token_ids", "reward")
    missing = [key for key in required if record.get(key) is None]
    if missing:
        raise UserInputError(f"rollout {i} lacks {', '.join(missing)}; each needs {', '.join(required)}")
    advantage = record.get("advantage")
    return Rollout(
        task=str(record["task"]), prompt_id=str(record["prompt_id"]), sample=int(record.get("sample") or 0),
        prompt=str(record.get("prompt") or ""), completion=str(record.get("completion") or ""),
        prompt_token_ids=[int(t) for t in record["prompt_token_ids"]],
        completion_token_ids=[int(t) for t in record["completion_token_ids"]],
        answer=record.get("answer"), reward=float(record["reward"]),
        advantage=None if advantage is None else float(advantage),
    )


def assign_advantage(rollouts: list[Rollout], advantage: str) -> list[Rollout]:
    """Each group's advantages from the named estimator, or the records' own ("given")."""
    from gradprobe.scoring import assign_advantages

    if advantage != GIVEN_ADVANTAGE:
        return assign_advantages(rollouts, ADVANTAGES.get(advantage))
    lacking = [i for i, r in enumerate(rollouts) if r.advantage is None]
    if lacking:
        raise UserInputError(f"advantage='given' but rollout {lacking[0]} has no advantage")
    return rollouts


def _measure(model: torch.nn.Module, rollouts: list[Rollout], batch: Any, layout: Any,
             described: dict[str, Any], params: list[str], intervals: str, engine: str, temperature: float,
             stats: bool, pad_token_id: int | None, sums: str, shard: str, chunk_size: int | None,
             checkpoint_activations: bool, max_memory_bytes: int | None, proxy_check: bool,
             task_grads_limit_mb: float | None, task_grads_seed: int, task_grads_free_disk_bytes: int | None,
             progress: Progress) -> Measurement:
    """The one path under `measure` and `measure_tensors`: the engine's units (`batch`, `layout`)
    to every figure. `described` holds scan.json's `advantage`, `loss` and `config`."""
    from gradprobe.caveats import scan_caveats
    from gradprobe.gradients.params import select_parameters
    from gradprobe.gradients.stage import StageSettings, choose_shard
    from gradprobe.gradients.summary import proxy_fidelity, summarise_gradients

    from gradprobe import distributed

    session = distributed.current()
    timings: dict[str, float] = {}
    param_names = select_parameters(model, params)
    all_names = select_parameters(model, ["all"])  # before the engine freezes every parameter
    settings = StageSettings(engine, temperature, _pad_token_id(model, pad_token_id), checkpoint_activations,
                             chunk_size, intervals=intervals, sums=sums, shard=shard)
    budget = max_memory_bytes or available_memory(next(model.parameters()).device)
    settings.shard = choose_shard(model, param_names, batch, layout, settings, budget, session.world)
    if settings.shard == "params":
        from gradprobe.distributed.sharded import shard_parameters

        shard_parameters(model, session)
    passes = 2 if intervals == "exact" else 1
    # The engines report whole prompts' units, once per pass.
    active = passes * sum(len(units) for units in layout.prompt_units()
                          if any(batch.is_active(u) for u in units))
    start = time.perf_counter()
    with progress.stage("gradients", active) as advance:
        result, fallback = run_stage(model, param_names, batch, layout, settings, budget, advance)
    summary = summarise_gradients(result, layout)
    timings["gradients_s"] = round(time.perf_counter() - start, 4)
    rows = prompt_rows(rollouts, layout, summary, batch)
    tasks = task_table(rows, summary, layout)
    measurement = Measurement(
        tasks=tasks,
        cosine={"tasks": layout.tasks, "matrix": summary.cosine},
        cosine_unbiased={"tasks": layout.tasks, "matrix": summary.cosine_unbiased},
        mixed=summary.mixed,
        modules=summary.modules,
        prompts=rows,
        verdict=dominance_verdict(tasks),
        stats=None,
        advantage=described["advantage"],
        loss=described["loss"],
        estimators={"grad_sq_norm_unbiased_ci": _interval_method(intervals)},
        engine={"name": result.engine, "chunk_size": result.micro_batch, "passes": result.passes,
                "intervals": intervals, "sums_device": result.sums_device, "processes": session.world,
                "shard": settings.shard,
                **({"fallback": fallback} if fallback else {})},
        model=model_info(model, int(sum(result.group_sizes))),
        config=described["config"],
        rollouts=rollouts,
        timings=timings,
    )
    if proxy_check and len(param_names) < len(all_names) and (
        sum(p.numel() for p in model.parameters()) <= PROXY_CHECK_MAX_PARAMETERS
    ):
        start = time.perf_counter()
        full_result, _ = run_stage(model, all_names, batch, layout, settings, budget, None, keep_sums=False)
        full = summarise_gradients(full_result, layout)
        timings["proxy_check_s"] = round(time.perf_counter() - start, 4)
        measurement.proxy_fidelity = {
            "params": params,
            **proxy_fidelity([summary.tasks[t]["grad_norm"] for t in layout.tasks],
                             [full.tasks[t]["grad_norm"] for t in layout.tasks]),
            "full_norm_ratio": {t: full.tasks[t]["norm_ratio"] for t in layout.tasks},
        }
    sharded_grads = None
    if task_grads_limit_mb is not None and result.sum_shards is not None:  # every rank holds a shard
        from gradprobe.distributed.sharded import task_gradients

        start = time.perf_counter()
        sharded_grads = task_gradients(result.sums, dict(zip(result.param_names, result.param_shapes)),
                                       result.sum_shards, layout.tasks, task_grads_limit_mb, task_grads_seed,
                                       task_grads_free_disk_bytes, session)
        timings["task_grads_s"] = round(time.perf_counter() - start, 4)
    if not session.is_writer:  # under torchrun: rank 0 has every reduction
        return measurement
    if stats:
        start = time.perf_counter()
        measurement.stats = run_statistics(rows, summary.task_moments)
        measurement.verdict = dominance_verdict(tasks, measurement.stats["dominance"])
        timings["stats_s"] = round(time.perf_counter() - start, 4)
    measurement.caveats = scan_caveats(tasks, rows, measurement.stats)
    if sharded_grads is not None:
        measurement.task_grads = sharded_grads
    elif task_grads_limit_mb is not None:
        from gradprobe import task_grads

        start = time.perf_counter()
        measurement.task_grads = task_grads.from_sums(result.paired_sums(), layout.tasks, task_grads_limit_mb,
                                                      task_grads_seed, free_disk_bytes=task_grads_free_disk_bytes)
        timings["task_grads_s"] = round(time.perf_counter() - start, 4)
    return measurement


def _advantage_info(advantage: str) -> dict[str, str]:
    if advantage == GIVEN_ADVANTAGE:
        return {"name": GIVEN_ADVANTAGE, "formula": "as given with the rollouts"}
    return {"name": advantage, "formula": ADVANTAGES.get(advantage).convention}


def _interval_method(intervals: str) -> str:
    from gradprobe.intervals import U_METHOD

    return U_METHOD if intervals != "none" else "none (--intervals none)"


def _pad_token_id(model: torch.nn.Module, given: int | None) -> int:
    if given is not None:
        return given
    return getattr(getattr(model, "config", None), "pad_token_id", None) or 0


def model_info(model: torch.nn.Module, n_selected: int) -> dict[str, Any]:
    """scan.json `model` for a model in memory (a loaded checkpoint adds its fingerprint)."""
    first = next(model.parameters())
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return {"path": str(path), "fingerprint": None, "dtype": str(first.dtype).removeprefix("torch."),
            "device": str(first.device), "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_selected_parameters": n_selected}


def check_prompts_per_task(rollouts: list[Rollout]) -> None:
    """The statistics compare prompts within a task: every task needs two."""
    prompts: dict[str, set[str]] = {}
    for r in rollouts:
        prompts.setdefault(r.task, set()).add(r.prompt_id)
    for task, ids in prompts.items():
        if len(ids) < 2:
            raise UserInputError(
                f"task {task!r} has {len(ids)} prompt in the rollouts; every task needs at least 2"
            )


def run_stage(model: Any, names: list[str], batch: Any, layout: Any, settings: Any, budget: int,
              advance: Callable[[int], None] | None, keep_sums: bool = True) -> tuple[Any, str | None]:
    """The gradient stage, its failures as one-line user errors."""
    from gradprobe import distributed
    from gradprobe.distributed.data_parallel import DataParallel
    from gradprobe.gradients.engine import EngineOutOfMemory, NonFiniteGradientError
    from gradprobe.gradients.stage import EngineUnavailable, run_gradient_stage

    session = distributed.current()  # under torchrun each process takes its share of the prompts
    sharded = settings.shard in ("sums", "params")
    parallel = DataParallel(session, sharded_sums=sharded, lockstep=sharded) if session.is_distributed else None
    try:
        return run_gradient_stage(model, names, batch, layout, settings, budget, advance, keep_sums, parallel)
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
        # Without rewards the reward covariates are constant 0: the tests drop them as constant.
        return np.array([0.0 if row[key] is None else row[key] for row in rows], dtype=float)

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


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def prompt_rows(rollouts: list[Rollout], layout: Any, summary: Any, batch: Any) -> list[dict[str, Any]]:
    """One row per prompt: its gradient norm and the covariates the statistics test against.

    `zero_advantage`: no unit of the prompt has a nonzero coefficient (no gradient). Without
    rewards (`measure_tensors(rewards=None)`) the reward figures are None and `degenerate` is
    `zero_advantage`.
    """
    rows = []
    units = layout.prompt_units()
    for p, (task, prompt_id) in enumerate(layout.prompt_keys):
        group = [rollouts[i] for i in layout.prompt_rollouts[p]]
        silent = not any(batch.is_active(u) for u in units[p])
        known = all(r.reward is not None for r in group)
        rewards = np.array([r.reward for r in group], dtype=float) if known else None
        rows.append({
            "task": task,
            "prompt_id": prompt_id,
            "prompt_grad_norm": float(summary.prompt_grad_norm[p]),
            "n_rollouts": len(group),
            "mean_reward": float(rewards.mean()) if known else None,
            "reward_std": float(rewards.std()) if known else None,
            "mean_abs_advantage": _mean([abs(r.advantage) for r in group]),
            "mean_completion_length": _mean([r.n_tokens for r in group]),
            "prompt_length": len(group[0].prompt_token_ids),
            "degenerate": bool(np.all(rewards == rewards[0])) if known else silent,
            "zero_advantage": silent,
        })
    return rows


def task_table(rows: list[dict[str, Any]], summary: Any, layout: Any) -> dict[str, dict[str, Any]]:
    """Per task: rollout statistics beside its gradient figures (scan.json `tasks`)."""
    table = {}
    for task in layout.tasks:
        mine = [row for row in rows if row["task"] == task]
        unrewarded = any(row["mean_reward"] is None for row in mine)
        table[task] = {
            "n_prompts": len(mine),
            "n_rollouts": sum(row["n_rollouts"] for row in mine),
            "mean_reward": None if unrewarded else float(np.average([row["mean_reward"] for row in mine],
                                                                    weights=[row["n_rollouts"] for row in mine])),
            "reward_std": None if unrewarded else _mean([row["reward_std"] for row in mine]),
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
