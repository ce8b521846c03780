"""GradprobeCallback under a real two-process DDP launch (torchrun, gloo on CPU): tests/trl_ddp_job.py.

One launch (about 20 s) checks the refusal of FSDP (one message, exit 2 on every rank), a user
error on one rank skipped by all, training unchanged by the probe, rank 0 alone writing the
JSONL, and the figures against one process measuring the whole gathered batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")

from transformers import AutoModelForCausalLM  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.artifacts import read_scan  # noqa: E402
from gradprobe.cli import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "trl_ddp_job.py"
ABORT = "terminate called without an active exception"  # see test_distributed.torchrun
FSDP_MESSAGE = "gradprobe: error: GradprobeCallback does not support FSDP launches"


@pytest.fixture(scope="module")
def job(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("trl-ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(JOB), str(tiny_qwen2), str(out)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "OMP_NUM_THREADS": "1",
                   "GRADPROBE_COLLECTIVE_TIMEOUT": "60"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment, cwd=ROOT)
    if run.returncode != 0 and ABORT in run.stderr:
        run = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    return out, json.loads((out / "result.json").read_text()), run.stderr


def test_fsdp_is_refused_with_one_message_and_exit_2(job):
    _, result, stderr = job
    assert result["fsdp_exit_code"] == 2
    assert stderr.count(FSDP_MESSAGE) == 1 and "Traceback" not in stderr


def test_a_failure_on_one_rank_is_skipped_by_every_rank(job):
    _, result, stderr = job
    assert stderr.count("gradprobe skipped step 1: rank 1: injected failure") == 2
    assert [probe["step"] for probe in result["probes"]] == [2]


def test_training_is_unchanged_and_the_update_is_the_measured_mixed_gradient(job):
    _, result, _ = job
    assert result["processes"] == result["engine_processes"] == 2
    assert result["with"] == result["without"] and len(result["with"]) == 2
    assert result["weights_equal"]
    # DDP's averaged gradient of the step is gradprobe's mixed update of the gathered batch.
    assert result["mixed_grad_norm"] == pytest.approx(result["with"][-1][2], rel=1e-5)


def test_rank_0_alone_writes_and_the_figures_equal_one_process_on_the_whole_batch(job, tmp_path):
    out, result, _ = job
    lines = [json.loads(line) for line in (out / "with" / "gradprobe.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2] and lines[0]["engine"]["processes"] == 2
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 14  # 7 prompts x 2: the fourth prompt's completions came from both ranks
    # dump_rollouts: each step's whole batch (both ranks' slices, in TRL's order), written once
    dumped = [json.loads(line) for line in (out / "with" / "gradprobe_rollouts" / "2.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "with" / "gradprobe_rollouts").iterdir()) == ["1.jsonl", "2.jsonl"]
    assert [(d["prompt_token_ids"], d["completion_token_ids"]) for d in dumped] == [
        (r["prompt_token_ids"], r["completion_token_ids"]) for r in rollouts]

    model = AutoModelForCausalLM.from_pretrained(out / "step-2")
    alone = gradprobe.measure(model, rollouts, advantage="given", loss="dapo", intervals="none", stats=False,
                              max_new_tokens=8)
    logged = result["probes"][0]
    for task, figures in alone.tasks.items():
        for key in ("grad_norm", "share", "grad_sq_norm_unbiased"):
            if figures[key] is None:  # a task with one prompt in the batch has no unbiased estimate
                assert lines[0]["tasks"][task][key] is None and f"gradprobe/{task}/{key}" not in logged
                continue
            assert lines[0]["tasks"][task][key] == pytest.approx(figures[key], rel=1e-5, abs=1e-9), (task, key)
            assert logged[f"gradprobe/{task}/{key}"] == pytest.approx(figures[key], rel=1e-5, abs=1e-9)
    assert logged["gradprobe/cos/add/echo"] == pytest.approx(alone.cosine_of("add", "echo"), rel=1e-5, abs=1e-9)

    # ... and `gradprobe scan --rollouts` on that batch and checkpoint (advantages from the rewards).
    scan = CliRunner().invoke(app, ["scan", str(out / "step-2"), "--rollouts", str(out / "rollouts.jsonl"),
                                    "--out", str(tmp_path / "scan"), "--advantage", "grpo", "--loss", "dapo",
                                    "--max-new-tokens", "8", "--intervals", "none", "--no-stats"])
    assert scan.exit_code == 0, scan.output
    for task, figures in read_scan(tmp_path / "scan")["tasks"].items():
        assert lines[0]["tasks"][task]["grad_norm"] == pytest.approx(figures["grad_norm"], rel=1e-5)
