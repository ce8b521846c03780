"""A two-process GRPO run with GradprobeCallback, launched by tests/test_trl_distributed.py
through torchrun (gloo on CPU): `python -m torch.distributed.run --nproc-per-node 2 trl_ddp_job.py
MODEL_DIR OUT_DIR`.

First the callback is made for a trainer marked as FSDP (HF's Trainer runs FSDP on GPUs only,
so the mark stands in for it): it must exit 2 on every rank, rank 0 printing one message. Then
each rank trains the tiny model twice with the same seed, with the callback (every step; rank
1's probe of step 1 fails with a user error, which every rank must skip) and without. Rank 0
writes OUT_DIR/result.json: the losses and TRL grad_norms of both runs, whether the final
weights are equal, the log entries of the probes, and the batch of the last probe
(rollouts.jsonl) with the model it was measured on (step-N/).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import gradprobe.api
from gradprobe.errors import UserInputError
from gradprobe.integrations.trl import GradprobeCallback
from gradprobe.rollouts import rollout_to_json

ROWS = [{"prompt": f"{a}+{b}=", "task": "add"} for a, b in [(1, 2), (3, 4), (5, 1), (2, 6)]] + [
    {"prompt": f"say {w}:", "task": "echo"} for w in ["ab", "cd", "ef", "gh"]]
STEPS = 2
# 7 prompts x 2 completions a step (each task at least 3), 7 rows per process: the fourth
# prompt's group spans both ranks.
PER_DEVICE, GENERATIONS, MAX_COMPLETION = 7, 2, 8


def digit_share(completions: list[str], **kwargs) -> list[float]:
    wanted = [str.isdigit if task == "add" else str.isalpha for task in kwargs["task"]]
    return [sum(map(test, text)) / max(1, len(text)) for test, text in zip(wanted, completions)]


class KeepModelAtStep(TrainerCallback):
    """Saves the model the probe of `step` sees (after backward, before the optimizer step)."""

    def __init__(self, trainer: trl.GRPOTrainer, step: int, path: Path) -> None:
        self.trainer, self.step, self.path = trainer, step, path

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and state.is_world_process_zero:
            self.trainer.accelerator.unwrap_model(self.trainer.model).save_pretrained(self.path)
            self.trainer.processing_class.save_pretrained(self.path)


def fail_once_on_rank_1() -> None:
    """Rank 1's first measurement raises a user error (rank 0 is then inside its own)."""
    measure, failed = gradprobe.api.measure, []

    def flaky(*args, **kwargs):
        if int(os.environ["RANK"]) == 1 and not failed:
            failed.append(True)
            raise UserInputError("injected failure")
        return measure(*args, **kwargs)

    gradprobe.api.measure = flaky


def make_trainer(model_dir: Path, out: Path) -> trl.GRPOTrainer:
    config = trl.GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PER_DEVICE, num_generations=GENERATIONS,
        max_completion_length=MAX_COMPLETION, max_steps=STEPS, learning_rate=5e-3, logging_steps=1,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0, log_completions=False,
        disable_tqdm=True, ddp_backend="gloo",
    )
    return trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=digit_share,
                           args=config, train_dataset=Dataset.from_list(ROWS),
                           processing_class=AutoTokenizer.from_pretrained(model_dir))


def main(model_dir: Path, out: Path) -> None:
    sharded = make_trainer(model_dir, out / "fsdp")
    sharded.is_fsdp_enabled = True
    try:
        GradprobeCallback(trainer=sharded, every_n_steps=1)
        refused = None
    except SystemExit as exit:
        refused = exit.code
    fail_once_on_rank_1()
    with_probe = make_trainer(model_dir, out / "with")
    callback = GradprobeCallback(trainer=with_probe, task_column="task", every_n_steps=1, dump_rollouts=True)
    with_probe.add_callback(callback)
    with_probe.add_callback(KeepModelAtStep(with_probe, STEPS, out / f"step-{STEPS}"))
    with_probe.train()
    without = make_trainer(model_dir, out / "without")
    without.train()
    if int(os.environ["RANK"]) != 0:
        return
    reference = without.accelerator.unwrap_model(without.model).state_dict()
    weights_equal = all(torch.equal(value, reference[name]) for name, value in
                        with_probe.accelerator.unwrap_model(with_probe.model).state_dict().items())

    def trained(trainer: trl.GRPOTrainer) -> list[list[float]]:
        return [[e["step"], e["loss"], e["grad_norm"]] for e in trainer.state.log_history if "loss" in e]

    (out / "rollouts.jsonl").write_text("".join(rollout_to_json(r) + "\n" for r in callback.last_measurement.rollouts))
    result = {
        "processes": with_probe.accelerator.num_processes, "fsdp_exit_code": refused,
        "with": trained(with_probe), "without": trained(without), "weights_equal": weights_equal,
        "probes": [e for e in with_probe.state.log_history if "gradprobe/seconds" in e],
        "mixed_grad_norm": callback.last_measurement.mixed["grad_norm"],
        "engine_processes": callback.last_measurement.engine["processes"],
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
