"""GradprobeCallback on a real trl GRPOTrainer: a tiny Qwen2 and a two-task dataset, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from gradprobe.artifacts import read_scan  # noqa: E402
from gradprobe.cli import app  # noqa: E402
from gradprobe.errors import UserInputError  # noqa: E402
from gradprobe.integrations.trl import GradprobeCallback  # noqa: E402

ROWS = [{"prompt": "1+2=", "task": "add"}, {"prompt": "3+4=", "task": "add"},
        {"prompt": "say ab:", "task": "echo"}, {"prompt": "say cd:", "task": "echo"}]
MAX_COMPLETION = 8


def digit_share(completions: list[str], **kwargs) -> list[float]:
    """A reward that differs between completions: the share of digits (add) or letters (echo)."""
    wanted = [str.isdigit if task == "add" else str.isalpha for task in kwargs["task"]]
    return [sum(map(test, text)) / max(1, len(text)) for test, text in zip(wanted, completions)]


def make_trainer(model_dir: Path, out: Path, rows: list[dict] = ROWS, kind: str = "GRPO",
                 max_steps: int = 3, dataset=None, reward=digit_share, **settings) -> trl.GRPOTrainer:
    config = getattr(trl, f"{kind}Config")(**{
        "output_dir": str(out), "per_device_train_batch_size": 8, "num_generations": 2,
        "max_completion_length": MAX_COMPLETION, "max_steps": max_steps, "learning_rate": 5e-3,
        "logging_steps": 1, "report_to": "none", "use_cpu": True, "bf16": False, "save_strategy": "no", "seed": 0,
        "log_completions": False, "disable_tqdm": True, **settings,
    })
    return getattr(trl, f"{kind}Trainer")(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward,
                           args=config, train_dataset=dataset if dataset is not None else Dataset.from_list(rows),
                           processing_class=AutoTokenizer.from_pretrained(model_dir))


class KeepModelAtStep(TrainerCallback):
    """Saves the model as the probe of `step` sees it: after backward, before the optimizer step."""

    def __init__(self, trainer, step: int, path: Path) -> None:
        self.trainer, self.step, self.path = trainer, step, path

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.trainer.model.save_pretrained(self.path)
            self.trainer.processing_class.save_pretrained(self.path)


@pytest.fixture(scope="module")
def trained(tiny_qwen2, tmp_path_factory):
    """One run with the callback (probe at step 2) and one without, same seed."""
    root = tmp_path_factory.mktemp("grpo")
    with_probe = make_trainer(tiny_qwen2, root / "with")
    callback = GradprobeCallback(trainer=with_probe, task_column="task", every_n_steps=2, intervals="exact",
                                 dump_rollouts=True, rollouts_dir=root / "with" / "rollouts")
    with_probe.add_callback(callback)
    with_probe.add_callback(KeepModelAtStep(with_probe, 2, root / "step2"))
    with_probe.train()
    without = make_trainer(tiny_qwen2, root / "without")
    without.train()
    return with_probe, without, callback, root


def test_metrics_reach_log_history_and_jsonl(trained):
    trainer, _, callback, root = trained
    probes = [entry for entry in trainer.state.log_history if "gradprobe/seconds" in entry]
    assert [entry["step"] for entry in probes] == [2]
    logged = probes[0]
    for task in ("add", "echo"):
        for figure in ("grad_norm", "share", "grad_sq_norm_unbiased"):
            assert f"gradprobe/{task}/{figure}" in logged
    assert logged["gradprobe/add/share"] + logged["gradprobe/echo/share"] == pytest.approx(1.0)
    assert -1 <= logged["gradprobe/cos/add/echo"] <= 1 and logged["gradprobe/seconds"] > 0
    lines = [json.loads(line) for line in (root / "with" / "gradprobe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2]
    assert lines[0]["tasks"]["add"]["grad_norm"] == logged["gradprobe/add/grad_norm"]
    assert lines[0]["tasks"]["add"]["n_prompts"] == 2 and lines[0]["loss"]["name"] == trainer.loss_type == "dapo"  # TRL 1.x default

    # One micro-batch per step: TRL's own (pre-clipping) grad_norm is the norm of gradprobe's mixed update.
    trl_grad_norm = next(e["grad_norm"] for e in trainer.state.log_history if e["step"] == 2 and "loss" in e)
    assert callback.last_measurement.mixed["grad_norm"] == pytest.approx(trl_grad_norm, rel=1e-4)


def test_rloo_trainer_update_is_the_measured_mixed_gradient(tiny_qwen2, tmp_path):
    trainer = make_trainer(tiny_qwen2, tmp_path, kind="RLOO", max_steps=1)
    callback = GradprobeCallback(trainer=trainer, every_n_steps=1)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.last_measurement.loss["name"] == "rloo"
    trl_grad_norm = next(e["grad_norm"] for e in trainer.state.log_history if "loss" in e)
    assert callback.last_measurement.mixed["grad_norm"] == pytest.approx(trl_grad_norm, rel=1e-4)


def test_training_is_unchanged_by_the_probe(trained):
    with_probe, without, _, _ = trained
    losses = [(e["step"], e["loss"]) for e in with_probe.state.log_history if "loss" in e]
    assert losses == [(e["step"], e["loss"]) for e in without.state.log_history if "loss" in e]
    assert len(losses) == 3
    reference = without.model.state_dict()
    for name, value in with_probe.model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_norms_equal_an_offline_scan_of_the_same_batch_and_checkpoint(trained):
    _, _, callback, root = trained
    measurement = callback.last_measurement
    log = root / "with" / "rollouts" / "2.jsonl"  # the step's batch as the callback dumped it
    assert sorted(p.name for p in log.parent.iterdir()) == ["1.jsonl", "2.jsonl", "3.jsonl"]
    assert {json.loads(line)["step"] for line in log.read_text().splitlines()} == {2}
    from gradprobe.dumps import read_dump

    assert read_dump(log).format == "trl"  # what `gradprobe track --rollouts-glob` reads
    result = CliRunner().invoke(app, ["scan", str(root / "step2"), "--rollouts", str(log), "--out",
                                      str(root / "offline"), "--advantage", "grpo", "--loss", "dapo",
                                      "--max-new-tokens", str(MAX_COMPLETION)])
    assert result.exit_code == 0, result.output
    offline = read_scan(root / "offline")
    for task, figures in offline["tasks"].items():
        for key in ("grad_norm", "share", "grad_sq_norm_unbiased"):
            assert measurement.tasks[task][key] == pytest.approx(figures[key], rel=1e-5, abs=1e-9), (task, key)
    assert any(r.advantage != 0 for r in measurement.rollouts)


def test_a_dataset_without_the_task_column_fails_at_construction(tiny_qwen2, tmp_path):
    trainer = make_trainer(tiny_qwen2, tmp_path, [{"prompt": r["prompt"]} for r in ROWS])
    with pytest.raises(UserInputError, match="no 'task' column"):
        GradprobeCallback(trainer=trainer, task_column="task", every_n_steps=1)
    with pytest.raises(UserInputError, match="no 'topic' column"):
        GradprobeCallback(trainer=trainer, task_column="topic", every_n_steps=1)
    trainer = make_trainer(tiny_qwen2, tmp_path, remove_unused_columns=True)
    with pytest.raises(UserInputError, match="remove_unused_columns=True drops the 'task' column"):
        GradprobeCallback(trainer=trainer, task_column="task", every_n_steps=1)


@pytest.mark.parametrize("loss_type, measured", [("grpo", "grpo"), ("bnpo", "bnpo"), ("dr_grpo", "dr_grpo"),
                                                 ("cispo", "dapo"), ("sapo", "grpo"), ("luspo", "rloo")])
def test_each_trl_loss_type_is_measured_as_the_update_trl_makes(tiny_qwen2, tmp_path, loss_type, measured):
    """One micro-batch on one process: TRL's (pre-clipping) grad_norm is the norm of the mixed
    update gradprobe measures with the matching aggregation, at importance ratio 1."""
    settings = {"epsilon_high": 4.0} if loss_type == "cispo" else {}
    trainer = make_trainer(tiny_qwen2, tmp_path, max_steps=1, loss_type=loss_type, **settings)
    callback = GradprobeCallback(trainer=trainer, every_n_steps=1)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.last_measurement.loss["name"] == measured
    trl_grad_norm = next(e["grad_norm"] for e in trainer.state.log_history if "loss" in e)
    assert callback.last_measurement.mixed["grad_norm"] == pytest.approx(trl_grad_norm, rel=1e-4)


def test_report_to_backends_receive_the_probe_in_on_log(tiny_qwen2, tmp_path):
    """Every `report_to` integration (wandb, TensorBoard, trackio, MLflow) is a TrainerCallback
    that writes what its on_log receives; the probe's figures must arrive there at their step,
    and TRL's own metrics of that step still arrive too."""

    class Backend(TrainerCallback):
        def __init__(self) -> None:
            self.logged: list[tuple[int, dict]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append((state.global_step, dict(logs)))

    trainer = make_trainer(tiny_qwen2, tmp_path, max_steps=2)
    backend = Backend()
    trainer.add_callback(backend)
    trainer.add_callback(GradprobeCallback(trainer=trainer, every_n_steps=2))
    trainer.train()
    probes = [(step, logs) for step, logs in backend.logged if "gradprobe/seconds" in logs]
    assert [step for step, _ in probes] == [2]
    assert probes[0][1]["gradprobe/seconds"] > 0 and "gradprobe/add/share" in probes[0][1]
    assert [step for step, logs in backend.logged if "loss" in logs] == [1, 2]


def test_unsupported_loss_types_and_launches_fail_at_construction(tiny_qwen2, tmp_path):
    trainer = make_trainer(tiny_qwen2, tmp_path, loss_type="cispo", epsilon_high=0.5)
    with pytest.raises(UserInputError, match="epsilon_high=0.5 < 1"):
        GradprobeCallback(trainer=trainer)
    trainer.loss_type = "vespo"
    with pytest.raises(UserInputError, match="this trainer uses 'vespo'"):
        GradprobeCallback(trainer=trainer)
    trainer = make_trainer(tiny_qwen2, tmp_path)
    trainer.is_deepspeed_enabled = True  # HF's Trainer sets it for a DeepSpeed launch
    with pytest.raises(UserInputError, match="does not support DeepSpeed launches"):
        GradprobeCallback(trainer=trainer)


def test_a_dataset_whose_columns_are_unknown_fails_at_its_first_batch(tiny_qwen2, tmp_path):
    from datasets import IterableDataset

    def rows():
        yield from ({"prompt": r["prompt"]} for r in ROWS)

    def length(completions: list[str], **kwargs) -> list[float]:
        return [float(len(text)) for text in completions]

    trainer = make_trainer(tiny_qwen2, tmp_path, max_steps=1, dataset=IterableDataset.from_generator(rows),
                           reward=length, accelerator_config={"dispatch_batches": False})
    assert trainer.train_dataset.column_names is None
    trainer.add_callback(GradprobeCallback(trainer=trainer, every_n_steps=1))
    with pytest.raises(UserInputError, match="the batch has no 'task' column"):
        trainer.train()


@pytest.mark.parametrize("setting, message", [({"params": ["nothing.*"]}, "matches no trainable parameter"),
                                              ({"intervals": "some"}, "intervals must be"),
                                              ({"every_n_steps": 0}, "at least 1")])
def test_bad_settings_fail_at_construction(tiny_qwen2, tmp_path, setting, message):
    trainer = make_trainer(tiny_qwen2, tmp_path)
    with pytest.raises(UserInputError, match=message):
        GradprobeCallback(trainer=trainer, **setting)


def test_report_reads_the_jsonl_series_and_plots_the_shares(trained, tmp_path):
    _, _, _, root = trained
    series = root / "with" / "gradprobe.jsonl"
    result = CliRunner().invoke(app, ["report", str(series), "--plots", str(tmp_path / "pics")])
    assert result.exit_code == 0, result.output
    assert "add" in result.output and "echo" in result.output
    assert (tmp_path / "pics" / "share_over_steps.png").read_bytes()[:4] == b"\x89PNG"
    shown = json.loads(CliRunner().invoke(app, ["report", str(series), "--json"]).stdout)
    assert shown["steps"] == [2] and sum(shown["figures"]["share"][t][0] for t in ("add", "echo")) == pytest.approx(1)


def test_the_readme_training_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## During training: TRL"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "/share'" in printed and "gradprobe/seconds" in printed
    lines = (tmp_path / "run" / "gradprobe.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


def test_docs_define_every_key_of_a_probe_line(trained):
    from test_docs import undefined

    _, _, _, root = trained
    line = json.loads((root / "with" / "gradprobe.jsonl").read_text().splitlines()[0])
    assert undefined(set(line)) == []
