"""GradprobeCallback: per-task gradients of a TRL GRPO or RLOO run, every N steps, in its logs.

Attached as TRL's own LogCompletionsCallback is:

    trainer.add_callback(GradprobeCallback(trainer=trainer, task_column="task", every_n_steps=50))

Every N optimizer steps, after that step's backward passes and before its optimizer step (so on
the very parameters and batch the step uses), it takes the step's generation batch as TRL made
it: prompt and completion token ids, rewards, advantages; each row's task comes from the
dataset column. `gradprobe.measure` turns it into per-task figures with TRL's loss aggregation,
the model left exactly as found (modes, flags, accumulated gradients, RNG), so training is
unchanged. The figures go through `transformers.Trainer.log` (so log_history and every
`report_to` backend get them) and, one JSON line per probe, into `gradprobe.jsonl` in the
trainer's output directory.

With `dump_rollouts=True` it also writes every training generation batch, as TRL generated and
scored it, to `gradprobe_rollouts/{step}.jsonl` in the output directory (`step` the optimizer step
that trains on it): one row per completion with `step`, `task`, `prompt_id` (unique within the
file), `sample`, `prompt` and `completion` (decoded, special tokens kept: the text as the model saw
it), `prompt_token_ids`, `completion_token_ids`, `reward` (the weighted sum TRL's advantages use),
`advantage` and `answer` when the dataset has one. `gradprobe track RUN_DIR --rollouts-glob
'gradprobe_rollouts/*.jsonl'` scans each checkpoint-N on those rows (gradprobe.dumps, "trl").

What is measured is the policy-gradient term at the current parameters (importance ratios 1):
TRL's KL penalty (beta > 0), entropy masking and bonus, and vLLM importance-sampling corrections
are not in it (a warning says so when they are on).

Under a multi-process DDP launch (`accelerate launch`, torchrun) every rank holds its slice of
the generation batch; the slices are gathered into the whole batch in TRL's global order, and
`gradprobe.measure` runs data-parallel on the trainer's own process group (each rank the
gradients of its share of whole prompts, the reductions summed over ranks,
`gradprobe.distributed`), so the figures equal one process measuring the whole batch. Rank 0
writes the JSONL. FSDP and DeepSpeed shard the parameters, which gradprobe's engine needs whole
on each rank: such launches are refused when the callback is made.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gradprobe.errors import UserInputError

JSONL_FILE = "gradprobe.jsonl"
ROLLOUTS_DIR = "gradprobe_rollouts"
GRPO_LOSS_TYPES = {"grpo": "grpo", "bnpo": "bnpo", "dapo": "dapo", "dr_grpo": "dr_grpo",
                   "cispo": "dapo", "sapo": "grpo", "luspo": "rloo"}
"""TRL's GRPO `loss_type` -> gradprobe's loss aggregation with the same gradient at importance
ratio 1: cispo's clamped, detached ratio is 1 there (epsilon_high >= 1) and it normalizes as
dapo; sapo's soft gate has slope 1 at ratio 1 and it averages as grpo; luspo sums each
sequence's token losses (its sequence-level ratio's 1/n_i cancels against that sum) and
averages over sequences, as RLOO does. vespo's gamma weights are not modelled."""
TASK_FIGURES = ("grad_norm", "share", "grad_sq_norm_unbiased")
"""Per-task figures logged as gradprobe/<task>/<figure>."""


@dataclass
class StepBatch:
    """One generation batch as TRL computed it, on the host; rows in TRL's order, each prompt's
    `group_size` completions next to each other."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: list[float]
    rewards: list[float]
    tasks: list[str]
    group_size: int


def step_batch(inputs: Sequence[Mapping[str, Any]], output: Mapping[str, Any], rewards: torch.Tensor,
               task_column: str, group_size: int) -> StepBatch:
    """The rows of `_generate_and_score_completions(inputs) -> output`, without padding;
    `rewards` are this process's rows' total rewards.

    A completion TRL masked out (mask_truncated_completions) keeps its tokens and gets advantage
    0, as its loss is zero."""
    if any(task_column not in row for row in inputs):
        raise UserInputError(f"the batch has no {task_column!r} column; keep it in the dataset "
                             "(remove_unused_columns=False, TRL's default)")
    prompts, completions, advantages = [], [], []
    for i, advantage in enumerate(output["advantages"].float().tolist()):
        prompt_mask = output["prompt_mask"][i].bool()
        completion_mask = output["completion_mask"][i].bool()
        prompts.append(output["prompt_ids"][i][prompt_mask].tolist())
        if completion_mask.any():
            completions.append(output["completion_ids"][i][completion_mask].tolist())
            advantages.append(advantage)
        else:
            completions.append(output["completion_ids"][i].tolist())
            advantages.append(0.0)
    return StepBatch(prompts, completions, advantages, rewards.float().tolist(),
                     [str(row[task_column]) for row in inputs], group_size)


def whole_batch(parts: Sequence[StepBatch]) -> StepBatch:
    """Every process's rows in rank order: TRL's global order of the generation batch (process r
    holds rows r*n .. (r+1)*n-1, and a group's completions are consecutive in it, possibly
    across two processes). UserInputError when the groups do not line up (another sampler)."""
    batch = StepBatch([row for part in parts for row in part.prompt_ids],
                      [row for part in parts for row in part.completion_ids],
                      [a for part in parts for a in part.advantages], [r for part in parts for r in part.rewards],
                      [t for part in parts for t in part.tasks], parts[0].group_size)
    size = batch.group_size
    if len(batch.tasks) % size:
        raise UserInputError(f"the step's batch has {len(batch.tasks)} completions, not a multiple of "
                             f"num_generations={size}")
    for start in range(0, len(batch.tasks), size):
        group = range(start, start + size)
        if len({tuple(batch.prompt_ids[i]) for i in group}) > 1 or len({batch.tasks[i] for i in group}) > 1:
            raise UserInputError(f"completions {start}..{start + size - 1} of the step's batch are not one "
                                 "prompt's group (TRL's RepeatSampler order is expected)")
    return batch


def batch_rollouts(batch: StepBatch) -> list[dict[str, Any]]:
    """gradprobe rollout records of a step's batch: prompt i // group_size is group i."""
    return [
        {"task": batch.tasks[i], "prompt_id": str(i // batch.group_size), "sample": i % batch.group_size,
         "prompt_token_ids": batch.prompt_ids[i], "completion_token_ids": batch.completion_ids[i],
         "reward": batch.rewards[i], "advantage": batch.advantages[i]}
        for i in range(len(batch.tasks))
    ]


def dump_rows(batch: StepBatch, step: int, tokenizer: Any, first_group: int = 0,
              answers: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """The rollout dump rows of one generation batch (module docstring); groups numbered from
    `first_group` so that several generation batches of one step keep distinct prompt ids."""
    rows = []
    for i, task in enumerate(batch.tasks):
        row = {"step": step, "task": task, "prompt_id": f"g{first_group + i // batch.group_size}",
               "sample": i % batch.group_size,
               "prompt": tokenizer.decode(batch.prompt_ids[i], skip_special_tokens=False),
               "completion": tokenizer.decode(batch.completion_ids[i], skip_special_tokens=False),
               "prompt_token_ids": batch.prompt_ids[i], "completion_token_ids": batch.completion_ids[i],
               "reward": batch.rewards[i], "advantage": batch.advantages[i]}
        if answers is not None and answers[i] is not None:
            row["answer"] = answers[i]
        rows.append(row)
    return rows


def logged_metrics(measurement: Any) -> dict[str, float]:
    """What goes to the trainer's log: gradprobe/<task>/<figure>, gradprobe/cos/<a>/<b> (tasks in
    sorted order) and gradprobe/seconds; figures that are undefined (None) are left out."""
    logs: dict[str, float] = {}
    for task in sorted(measurement.tasks):
        for figure in TASK_FIGURES:
            value = measurement.tasks[task][figure]
            if value is not None and math.isfinite(value):
                logs[f"gradprobe/{task}/{figure}"] = float(value)
    names = sorted(measurement.tasks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            value = measurement.cosine_of(a, b)
            if value is not None:
                logs[f"gradprobe/cos/{a}/{b}"] = float(value)
    logs["gradprobe/seconds"] = measurement.seconds
    return logs


def jsonl_record(step: int, epoch: float | None, measurement: Any) -> dict[str, Any]:
    """One line of gradprobe.jsonl: the step's per-task figures, cosines and mixed update."""
    return {
        "step": step,
        "epoch": epoch,
        "seconds": measurement.seconds,
        "tasks": measurement.tasks,
        "cosine": measurement.cosine,
        "cosine_unbiased": measurement.cosine_unbiased,
        "mixed": measurement.mixed,
        "verdict": measurement.verdict,
        "advantage": measurement.advantage,
        "loss": measurement.loss,
        "engine": measurement.engine,
    }


class GradprobeCallback(TrainerCallback):
    """Per-task gradient figures of a trl GRPOTrainer or RLOOTrainer run every `every_n_steps`.

    `params`, `intervals` and `engine` are `gradprobe.measure`'s (intervals "none" by default:
    one forward and backward per micro-batch; "exact" adds a second pass for the confidence
    intervals in the JSONL). `output_file` defaults to gradprobe.jsonl in args.output_dir.
    `dump_rollouts=True` writes every training generation batch to `rollouts_dir` (default
    gradprobe_rollouts in args.output_dir) as `<step>.jsonl` (rank 0, the ranks' slices gathered):
    the rows `gradprobe scan --rollouts` measures again offline and `gradprobe track
    --rollouts-glob` reads (module docstring).
    `last_measurement` holds the latest `gradprobe.Measurement`.
    """

    def __init__(self, trainer: Any, task_column: str = "task", every_n_steps: int = 50,
                 params: Sequence[str] = ("all",), intervals: str = "none", engine: str = "auto",
                 output_file: str | Path | None = None, stats: bool = False, dump_rollouts: bool = False,
                 rollouts_dir: str | Path | None = None) -> None:
        if every_n_steps < 1:
            raise UserInputError("every_n_steps must be at least 1")
        self.trainer = trainer
        self.task_column = task_column
        self.every_n_steps = every_n_steps
        self.params = list(params)
        self.intervals = intervals
        self.engine = engine
        self.stats = stats
        try:
            _check_launch(trainer)
            self.loss, self.max_new_tokens = _loss_of(trainer)
            _check_measure_settings(trainer, self.loss, self.params, intervals, engine)
            _check_task_column(trainer, task_column)
        except UserInputError as error:
            if trainer.accelerator.num_processes > 1:
                _exit_every_rank(trainer, error)
            raise
        _warn_unmeasured_terms(trainer, kl_in_loss=not isinstance(trainer, _rloo_trainer()))
        _warn_batch_differences(trainer)
        self.output_file = Path(output_file) if output_file else Path(trainer.args.output_dir) / JSONL_FILE
        self.rollouts_dir = (Path(rollouts_dir) if rollouts_dir else Path(trainer.args.output_dir) / ROLLOUTS_DIR
                             ) if dump_rollouts else None
        self._groups: dict[int, int] = {}  # step -> prompt groups dumped so far in this process
        self.last_measurement: Any = None
        self._batch: StepBatch | None = None
        self._rewards: torch.Tensor | None = None
        self._pending: dict[str, float] | None = None
        self._capture_batches(trainer)

    def _capture_batches(self, trainer: Any) -> None:
        """Wrap the trainer's (instance) batch and reward methods to keep their latest outputs."""
        generate, rewards = trainer._generate_and_score_completions, trainer._calculate_rewards

        def calculate_rewards(*args: Any, **kwargs: Any) -> torch.Tensor:
            self._rewards = rewards(*args, **kwargs)
            return self._rewards

        def generate_and_score(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            output = generate(inputs, *args, **kwargs)
            if trainer.model.training and self._rewards is not None:
                weights = trainer.reward_weights.to(self._rewards.device)
                total = (self._rewards * weights.unsqueeze(0)).nansum(dim=1)
                # The rewards are gathered over processes; this process's rows are its slice.
                start = trainer.accelerator.process_index * len(inputs)
                self._batch = step_batch(inputs, output, total[start:start + len(inputs)].cpu(),
                                         self.task_column, trainer.num_generations)
                if self.rollouts_dir is not None:
                    self._dump(self._batch, trainer.state.global_step + 1, [row.get("answer") for row in inputs])
            return output

        trainer._calculate_rewards = calculate_rewards
        trainer._generate_and_score_completions = generate_and_score

    def _dump(self, batch: StepBatch, step: int, answers: list[Any]) -> None:
        """Write a generation batch to the step's file: the first batch of a step replaces the
        file (a resumed run redoes the step), later ones are appended. Under several processes
        the slices are gathered into TRL's global order and rank 0 writes (every rank generates
        in lockstep, so every rank takes part in the gather)."""
        from gradprobe import distributed

        with distributed.joined_session() as session:
            if session.is_distributed:
                parts = session.all_gather_objects((batch, answers), "gradprobe rollout dump")
                batch = whole_batch([part for part, _ in parts])
                answers = [answer for _, part in parts for answer in part]
            if not session.is_writer:
                return
        first = self._groups.get(step)
        rows = dump_rows(batch, step, _tokenizer(self.trainer), first or 0, answers)
        self._groups[step] = (first or 0) + len(batch.tasks) // batch.group_size
        self.rollouts_dir.mkdir(parents=True, exist_ok=True)
        with (self.rollouts_dir / f"{step}.jsonl").open("w" if first is None else "a", encoding="utf-8") as stream:
            stream.writelines(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1  # the step whose optimizer update comes next
        if step % self.every_n_steps or self._batch is None:
            return  # the same on every rank: each runs the same steps
        try:
            self._probe(step, state.epoch)
        except UserInputError as exc:  # a failed probe is reported, and training goes on
            warnings.warn(f"gradprobe skipped step {step}: {exc}", stacklevel=2)

    def _probe(self, step: int, epoch: float | None) -> None:
        """Measure the step's whole batch; on several processes every rank takes part, a failure
        on any rank is raised on all of them (`Session.agree`), and rank 0 writes the line."""
        from gradprobe import distributed
        from gradprobe.api import measure

        start = time.perf_counter()
        with distributed.joined_session() as session:
            try:
                batch = whole_batch(session.all_gather_objects(self._batch, "gradprobe batch"))
                model = self.trainer.accelerator.unwrap_model(self.trainer.model)
                measurement = measure(
                    model, batch_rollouts(batch), advantage="given", loss=self.loss, params=self.params,
                    intervals=self.intervals, engine=self.engine, temperature=self.trainer.temperature,
                    max_new_tokens=self.max_new_tokens, stats=self.stats,
                    pad_token_id=_pad_token_id(self.trainer),
                )
                measurement.timings["measure_s"] = round(time.perf_counter() - start, 4)
                if session.is_writer:
                    self.output_file.parent.mkdir(parents=True, exist_ok=True)
                    with self.output_file.open("a", encoding="utf-8") as stream:
                        stream.write(json.dumps(jsonl_record(step, epoch, measurement), allow_nan=False) + "\n")
            except Exception as error:
                if getattr(error, "shared", False):  # raised on every rank already
                    raise
                session.agree("gradprobe probe", error)  # raises it here, and on the other ranks
                raise
            session.agree("gradprobe probe")
        self.last_measurement = measurement
        # Every rank logs the same figures (the reductions are summed over ranks), as TRL's own
        # gathered metrics are; the report_to backends write from the main process only.
        self._pending = logged_metrics(measurement)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pending is None:
            return
        from transformers import Trainer

        logs, self._pending = self._pending, None
        # The base class's log: TRL's own `log` would flush (and reset) its averaged metrics here.
        # Logging clears control.should_log, which the trainer's own log of this step still needs.
        should_log = control.should_log
        Trainer.log(self.trainer, logs)
        control.should_log = self.trainer.control.should_log = should_log


def _rloo_trainer() -> type:
    from trl import RLOOTrainer

    return RLOOTrainer


def _loss_of(trainer: Any) -> tuple[str, int]:
    """gradprobe's loss aggregation for the trainer, and the L_max of dr_grpo."""
    from trl import GRPOTrainer

    if isinstance(trainer, _rloo_trainer()):
        return "rloo", trainer.max_completion_length
    if not isinstance(trainer, GRPOTrainer):
        raise UserInputError(f"GradprobeCallback works with trl's GRPOTrainer and RLOOTrainer, not "
                             f"{type(trainer).__name__}")
    if trainer.loss_type not in GRPO_LOSS_TYPES:
        raise UserInputError(f"GradprobeCallback measures loss_type {', '.join(GRPO_LOSS_TYPES)}; "
                             f"this trainer uses {trainer.loss_type!r}")
    if trainer.loss_type == "cispo" and trainer.epsilon_high < 1:
        raise UserInputError(f"cispo with epsilon_high={trainer.epsilon_high} < 1 scales every token's "
                             "gradient by it; GradprobeCallback measures cispo with epsilon_high >= 1")
    return GRPO_LOSS_TYPES[trainer.loss_type], trainer.max_completion_length


def _tokenizer(trainer: Any) -> Any:
    """The trainer's tokenizer (a processor's own tokenizer for vision-language models)."""
    processing = trainer.processing_class
    return getattr(processing, "tokenizer", processing)


def _pad_token_id(trainer: Any) -> int | None:
    return getattr(_tokenizer(trainer), "pad_token_id", None)


def _check_measure_settings(trainer: Any, loss: str, params: list[str], intervals: str, engine: str) -> None:
    """Bad settings fail when the callback is made, not at its first probe."""
    from gradprobe.api import GIVEN_ADVANTAGE, check_settings
    from gradprobe.gradients.params import select_parameters

    check_settings(GIVEN_ADVANTAGE, loss, engine, intervals)
    select_parameters(trainer.accelerator.unwrap_model(trainer.model), params)


DDP_LAUNCHES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA",
                "MULTI_SDAA", "MULTI_HPU")
"""accelerate's distributed types that keep every parameter whole on each process (DDP)."""


def _check_launch(trainer: Any) -> None:
    """One process or DDP: gradprobe's distributed engine sums per-prompt reductions over ranks
    that each hold the whole model, so sharded parameters (FSDP, DeepSpeed ZeRO) are refused."""
    kind = getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type))
    sharded = ("FSDP" if getattr(trainer, "is_fsdp_enabled", False) else
               "DeepSpeed" if getattr(trainer, "is_deepspeed_enabled", False) else None)
    if sharded is None and kind not in DDP_LAUNCHES:
        sharded = kind
    if sharded is None and any(_is_dtensor(p) for p in trainer.model.parameters()):
        sharded = "sharded (DTensor) parameters"
    if sharded is not None:
        raise UserInputError(
            f"GradprobeCallback does not support {sharded} launches: gradprobe's distributed engine needs "
            "every parameter whole on each process; launch with DDP (accelerate launch without FSDP or "
            "DeepSpeed, or torchrun), or measure saved checkpoints with `gradprobe scan`")


def _is_dtensor(parameter: torch.Tensor) -> bool:
    return type(parameter).__name__ == "DTensor" or type(getattr(parameter, "data", None)).__name__ == "DTensor"


def _exit_every_rank(trainer: Any, error: UserInputError) -> None:
    """A bad setting under a multi-process launch: one message (from the main process, not one
    traceback per rank) and exit status 2 on every rank, as the CLI does for bad input."""
    if trainer.accelerator.is_main_process:
        print(f"gradprobe: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _check_task_column(trainer: Any, task_column: str) -> None:
    """The column must reach the trainer's batches (a dataset whose columns are unknown until
    read, such as a generator's, fails at its first batch instead, in `step_batch`)."""
    dataset = trainer.train_dataset
    columns = getattr(dataset, "column_names", None)
    if columns is not None and task_column not in columns:
        raise UserInputError(f"the train dataset has no {task_column!r} column (columns: "
                             f"{', '.join(columns)}); pass task_column= naming each row's task")
    if trainer.args.remove_unused_columns:
        raise UserInputError(f"remove_unused_columns=True drops the {task_column!r} column before the "
                             "trainer's batches; set it to False (TRL's default)")
    if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
        raise UserInputError("GradprobeCallback does not measure tool-calling rollouts (tool tokens "
                             "are masked out of TRL's loss)")


def _warn_unmeasured_terms(trainer: Any, kl_in_loss: bool) -> None:
    """Warn about loss terms the probe leaves out (RLOO's KL is in its rewards, so measured)."""
    notes = []
    if getattr(trainer, "beta", 0.0) and kl_in_loss:
        notes.append(f"the KL penalty (beta={trainer.beta})")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        notes.append("the entropy mask (top_entropy_quantile < 1)")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        notes.append("the entropy bonus (entropy_coef)")
    if getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False):
        notes.append("vLLM's importance-sampling correction")
    if notes:
        warnings.warn(f"gradprobe measures the policy-gradient term only; not in it: {', '.join(notes)}",
                      stacklevel=3)


def _warn_batch_differences(trainer: Any) -> None:
    """Warn where the probe's batch or normalization is not exactly the optimizer step's."""
    args, notes = trainer.args, []
    steps_per_generation = getattr(args, "steps_per_generation", None) or args.gradient_accumulation_steps
    if steps_per_generation != args.gradient_accumulation_steps:
        notes.append(f"a generation batch spans steps_per_generation={steps_per_generation} micro-batches but an "
                     f"optimizer step {args.gradient_accumulation_steps}; the probe measures the latest "
                     "whole generation batch")
    if getattr(trainer, "num_iterations", 1) > 1:
        notes.append(f"num_iterations={trainer.num_iterations} reuses each batch; later steps on it have "
                     "importance ratios other than 1, the probe measures at ratio 1")
    if getattr(trainer, "loss_type", None) == "bnpo" and (
            trainer.accelerator.num_processes * args.gradient_accumulation_steps > 1):
        notes.append("bnpo normalizes each micro-batch by its own tokens; the probe by the whole batch's "
                     "(the same when micro-batches have equal token counts)")
    for note in notes:
        warnings.warn(f"gradprobe: {note}", stacklevel=3)
