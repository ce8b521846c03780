"""The task weights and `gradprobe track` in a real TRL GRPOTrainer run: a GRPOTrainer subclass whose
`_get_train_sampler` returns TaskWeightedSampler trains a tiny Qwen2 for a few steps, saving
checkpoint-N and, through GradprobeCallback(dump_rollouts=True), every step's rollouts; the
sampler is shown to be the one that chose the prompts, and `gradprobe track` reads the run as a
TRL user has it."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import MIX_ROWS  # noqa: E402
from gradprobe import schema  # noqa: E402
from gradprobe.cli import app  # noqa: E402
from gradprobe.integrations.samplers import TaskWeightedSampler  # noqa: E402
from gradprobe.integrations.trl import GradprobeCallback  # noqa: E402

ROWS = [r for r in MIX_ROWS if isinstance(r["prompt"], str)]  # add and echo, 6 prompts each
WEIGHTS = {"add": 0.75, "echo": 0.25}
RUN_WEIGHTS = {"add": 0.5, "echo": 0.5}  # 12 prompts a step: each task gets the 2 a scan needs
MAX_STEPS, SAVE_STEPS, GENERATIONS, BATCH = 5, 2, 2, 24


def overlap(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """Fraction of the answer's characters in the completion (varies within a group)."""
    return [sum(ch in c for ch in a) / len(a) for c, a in zip(completions, answer)]


def weights_file(folder: Path, weights: dict[str, float]) -> Path:
    from gradprobe.weights import write_weights

    document = {"schema_version": "1.1", "kind": "weights", "gradprobe_version": "0", "source": "test",
                "source_kind": "scan", "policy": "equalise-share", "formula": "f", "caution": "c", "floor": 0.01,
                "weights": weights, "tasks": {t: {"weight": w, "old_weight": 0.5, "inputs": {}}
                                              for t, w in weights.items()}}
    write_weights(folder / "weights.json", document)
    return folder / "weights.json"


class WeightedGRPOTrainer(trl.GRPOTrainer):
    """The README's subclass: TRL's own sampler replaced by the task-weighted one."""

    weights_file: str = ""
    num_samples: int | None = None

    def _get_train_sampler(self, dataset=None):
        self.sampler = TaskWeightedSampler.for_grpo(self, dataset, weights_file=self.weights_file,
                                                    task_key="task", num_samples=self.num_samples)
        return self.sampler


def make_trainer(model_dir: Path, out: Path, rows: list[dict], weights: Path, **config) -> WeightedGRPOTrainer:
    args = trl.GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_generations=GENERATIONS,
        max_completion_length=6, learning_rate=5e-2, logging_steps=1, report_to="none", use_cpu=True,
        bf16=False, seed=0, log_completions=False, disable_tqdm=True, **config)
    WeightedGRPOTrainer.weights_file = str(weights)
    return WeightedGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=overlap,
                               args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=AutoTokenizer.from_pretrained(model_dir))


def test_the_overridden_method_has_trl_signature():
    """The README's override matches the installed TRL's `_get_train_sampler(self, dataset=None)`."""
    assert list(inspect.signature(trl.GRPOTrainer._get_train_sampler).parameters) == ["self", "dataset"]


@pytest.fixture(scope="module")
def grpo_run(tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-weighted")
    weights = weights_file(root, RUN_WEIGHTS)
    WeightedGRPOTrainer.num_samples = MAX_STEPS * BATCH // GENERATIONS  # one epoch: one stream of draws
    trainer = make_trainer(tiny_qwen2, root / "run", ROWS, weights, max_steps=MAX_STEPS,
                           save_strategy="steps", save_steps=SAVE_STEPS)
    trainer.add_callback(GradprobeCallback(trainer=trainer, task_column="task", every_n_steps=1000,
                                           dump_rollouts=True))
    trainer.train()
    WeightedGRPOTrainer.num_samples = None
    return trainer, root


def test_grpo_trains_on_the_prompts_the_sampler_drew(grpo_run):
    trainer, root = grpo_run
    assert isinstance(trainer.sampler, TaskWeightedSampler)
    # the same sampler, made afresh, yields the prompts every dumped step was generated from
    fresh = TaskWeightedSampler.for_grpo(trainer, weights_file=str(root / "weights.json"), task_key="task",
                                         num_samples=MAX_STEPS * BATCH // GENERATIONS)
    order = list(fresh)
    encode = lambda text: trainer.processing_class(text, add_special_tokens=False).input_ids  # noqa: E731
    per_step = BATCH  # rows per generation batch (steps_per_generation = 1)
    for step in range(1, MAX_STEPS + 1):
        rows = [json.loads(line) for line in (root / "run" / "gradprobe_rollouts" / f"{step}.jsonl").open()]
        drawn = order[(step - 1) * per_step: step * per_step]
        assert [r["task"] for r in rows] == [ROWS[i]["task"] for i in drawn]
        assert [r["prompt_token_ids"] for r in rows] == [encode(ROWS[i]["prompt"]) for i in drawn]
        assert [r["prompt_id"] for r in rows] == [f"g{k // GENERATIONS}" for k in range(per_step)]
        assert all(r["step"] == step and r["completion_token_ids"] for r in rows)


def test_grpo_dataloader_draws_tasks_at_the_weights(tiny_qwen2, tmp_path):
    """GRPOTrainer's own dataloader over the subclass's sampler: one task per prompt group, counts
    within 4.5 binomial standard deviations of n w_t (row counts unlike the weights)."""
    labels = ["add"] * 30 + ["echo"] * 170
    weights = weights_file(tmp_path, WEIGHTS)
    WeightedGRPOTrainer.num_samples = 6000
    try:
        trainer = make_trainer(tiny_qwen2, tmp_path / "out", [{"prompt": "p", "task": t} for t in labels], weights,
                               max_steps=1)
        rows = [row for batch in trainer.get_train_dataloader() for row in batch]
    finally:
        WeightedGRPOTrainer.num_samples = None
    assert len(rows) == 6000 * GENERATIONS
    drawn = [row["task"] for row in rows[::GENERATIONS]]
    for task, w in WEIGHTS.items():
        count = drawn.count(task)
        assert abs(count - len(drawn) * w) <= 4.5 * math.sqrt(len(drawn) * w * (1 - w)), (task, count)


def test_track_reads_the_trl_run(grpo_run, tmp_path):
    """`gradprobe track` on the run directory as TRL left it: checkpoint-2 and -4 (save_steps) and
    the final checkpoint-5, scanned on the callback's dumps of steps 3, 5 and (no step 6) 5, with
    their exact token ids."""
    _, root = grpo_run
    out = tmp_path / "track"
    result = CliRunner().invoke(app, ["track", str(root / "run"), "--rollouts-glob", "gradprobe_rollouts/*.jsonl",
                                      "--window", "1", "--device", "cpu", "--no-plots", "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "track.json").read_text())
    schema.validate(document, "track")
    assert [(c["step"], c["layout"], c["rollouts"]["dump_step"]) for c in document["checkpoints"]] == [
        (2, "trl", 3), (4, "trl", 5), (5, "trl", 5)]
    assert document["dumps"]["formats"] == ["trl"] and document["dumps"]["n_unmatched"] == 0
    dumped = [json.loads(line) for line in (root / "run" / "gradprobe_rollouts" / "3.jsonl").open()]
    scanned = [json.loads(line) for line in (out / "inputs" / "step-2.jsonl").open()]
    assert [r["prompt_token_ids"] for r in scanned] == [r["prompt_token_ids"] for r in dumped]
    assert [r["completion_token_ids"] for r in scanned] == [r["completion_token_ids"] for r in dumped]
    assert set(document["tasks"]) == set(WEIGHTS)
