"""The CLI through typer's runner: a real scan, offline mode, determinism and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import MIX_ROWS, save_tiny_model, write_jsonl
from gradprobe.cli import app

runner = CliRunner()
FAST = ["-k", "3", "--max-new-tokens", "5", "--prompts-per-task", "3", "--reward", "add=numeric",
        "--reward", "regex:[a-m]"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def scan(model: Path, mix: Path, out: Path, *extra: str):
    return run("scan", model, mix, "--out", out, *FAST, *extra)


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_scan_writes_report_and_artifacts(tiny_llama, tiny_mix, tmp_path):
    out = tmp_path / "scan"
    result = scan(tiny_llama, tiny_mix, out)
    assert result.exit_code == 0, result.output
    assert "Per-task gradients" in result.output
    document = json.loads((out / "scan.json").read_text())
    assert document["schema_version"] == "1.1"
    dominance = document["stats"]["dominance"]
    assert ("dominates" in document["verdict"]) == (dominance["dominant"] is not None)
    assert document["verdict"].split(" ")[0] in result.output
    assert set(document["tasks"]) == {"add", "echo", "chat"}
    for task in document["tasks"].values():
        assert {"grad_norm", "grad_sq_norm", "norm_ratio", "share", "mean_reward", "n_prompts",
                "n_rollouts"} <= set(task)
        assert task["n_prompts"] == 3 and task["n_rollouts"] == 9
    assert document["cosine"]["tasks"] == ["add", "echo", "chat"]
    assert {"generate_s", "gradients_s"} <= set(document["timings"])
    assert document["mix"]["sha256"] and document["model"]["fingerprint"]
    lines = [json.loads(l) for l in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == 27
    for key in ("task", "prompt_id", "sample", "prompt", "completion", "prompt_token_ids",
                "completion_token_ids", "reward", "advantage", "n_tokens"):
        assert key in lines[0]
    chat = [l for l in lines if l["task"] == "chat"][0]
    assert chat["prompt"].startswith("user: count") and chat["prompt"].endswith("assistant: ")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_same_seed_same_numbers(tiny_llama, tiny_mix, tmp_path):
    docs = []
    for name in ("one", "two"):
        assert scan(tiny_llama, tiny_mix, tmp_path / name, "--seed", "7").exit_code == 0
        docs.append(json.loads((tmp_path / name / "scan.json").read_text()))
    assert docs[0]["tasks"] == docs[1]["tasks"]
    assert docs[0]["cosine"] == docs[1]["cosine"]


def test_one_task_mix_has_no_cosines(tiny_llama, tmp_path):
    mix = write_jsonl(tmp_path / "one.jsonl", [r for r in MIX_ROWS if r["task"] == "add"])
    result = scan(tiny_llama, mix, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "One task only" in result.output
    assert "Task-gradient cosines" not in result.output


def test_offline_rollouts_mode(tiny_qwen2, tiny_llama, tiny_mix, tmp_path):
    assert scan(tiny_llama, tiny_mix, tmp_path / "first").exit_code == 0
    rows = [json.loads(l) for l in (tmp_path / "first" / "rollouts.jsonl").read_text().splitlines()]
    trainer = [{k: r[k] for k in ("task", "prompt_id", "prompt", "completion", "reward")} for r in rows]
    log = write_jsonl(tmp_path / "trainer.jsonl", trainer)
    result = run("scan", tiny_llama, "--rollouts", log, "--out", tmp_path / "offline", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "offline" / "scan.json").read_text())
    assert document["tasks"]["add"]["n_rollouts"] == 9
    # With token ids given, offline gradients equal the sampled scan's exactly.
    with_ids = write_jsonl(tmp_path / "ids.jsonl", [
        {k: r[k] for k in ("task", "prompt_id", "prompt", "completion", "reward", "prompt_token_ids",
                           "completion_token_ids")} for r in rows])
    result = run("scan", tiny_llama, "--rollouts", with_ids, "--out", tmp_path / "ids", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "first" / "scan.json").read_text())
    again = json.loads((tmp_path / "ids" / "scan.json").read_text())
    for task in first["tasks"]:
        assert again["tasks"][task]["grad_norm"] == pytest.approx(first["tasks"][task]["grad_norm"], rel=1e-5)


def test_missing_model_and_mix(tiny_llama, tiny_mix, tmp_path):
    assert_user_error(scan(tmp_path / "nope", tiny_mix, tmp_path / "o"), "no such directory")
    assert_user_error(scan(tiny_llama, tmp_path / "nope.jsonl", tmp_path / "o"), "no such file")
    assert not (tmp_path / "o").exists()


def test_malformed_jsonl_names_the_line(tiny_llama, tmp_path):
    mix = tmp_path / "bad.jsonl"
    mix.write_text(json.dumps(MIX_ROWS[0]) + "\n" + json.dumps(MIX_ROWS[1]) + "\n{not json\n")
    assert_user_error(scan(tiny_llama, mix, tmp_path / "o"), "bad.jsonl:3", "malformed")


def test_missing_column_and_field_mapping(tiny_llama, tmp_path):
    rows = [{"source": r["task"], "question": r["prompt"], "answer": r["answer"]} for r in MIX_ROWS]
    mix = write_jsonl(tmp_path / "renamed.jsonl", rows)
    assert_user_error(scan(tiny_llama, mix, tmp_path / "o"), "missing column", "--task-field")
    result = scan(tiny_llama, mix, tmp_path / "o", "--task-field", "source", "--prompt-field", "question")
    assert result.exit_code == 0, result.output


def test_empty_task_and_too_few_prompts(tiny_llama, tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", MIX_ROWS[:6] + [{"task": "", "prompt": "x", "answer": "1"}])
    assert_user_error(scan(tiny_llama, empty, tmp_path / "o"), "empty task")
    lonely = write_jsonl(tmp_path / "lonely.jsonl", MIX_ROWS[:6] + [{"task": "solo", "prompt": "x", "answer": "1"}])
    assert_user_error(run("scan", tiny_llama, lonely, "--out", tmp_path / "o"), "solo", "at least 2")


def test_bad_reward_options(tiny_llama, tiny_mix, tmp_path):
    assert_user_error(scan(tiny_llama, tiny_mix, tmp_path / "o", "--reward", "nosuch=exact"),
                      "unknown task 'nosuch'")
    assert_user_error(scan(tiny_llama, tiny_mix, tmp_path / "o", "--reward", "add=bogus"),
                      "unknown reward 'bogus'", "exact")


def test_user_reward_function(tiny_llama, tiny_mix, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def longish(completion, answer, **kw):\n    return float(len(completion) > 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = scan(tiny_llama, tiny_mix, tmp_path / "o", "--reward", "echo=my_rewards:longish")
    assert result.exit_code == 0, result.output
    rows = [json.loads(l) for l in (tmp_path / "o" / "rollouts.jsonl").read_text().splitlines()]
    echo = [r for r in rows if r["task"] == "echo"]
    assert all(r["reward"] == float(len(r["completion"]) > 2) for r in echo)


def test_group_size_one_needs_a_baseline_free_advantage(tiny_llama, tiny_mix, tmp_path):
    assert_user_error(scan(tiny_llama, tiny_mix, tmp_path / "o", "-k", "1"), "--group-size 1")
    result = scan(tiny_llama, tiny_mix, tmp_path / "o", "-k", "1", "--advantage", "none")
    assert result.exit_code == 0, result.output


def test_pickled_weights_are_refused(tiny_llama, tiny_mix, tmp_path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    for file in tiny_llama.iterdir():
        if file.suffix != ".safetensors":
            (model_dir / file.name).write_bytes(file.read_bytes())
    torch.save(load_file(tiny_llama / "model.safetensors"), model_dir / "pytorch_model.bin")
    assert_user_error(scan(model_dir, tiny_mix, tmp_path / "o"), "pickled", "--allow-pickle")
    (model_dir / "pytorch_model.bin").unlink()
    assert_user_error(scan(model_dir, tiny_mix, tmp_path / "o"), "no model weights")


def test_non_finite_gradients_name_the_task(tmp_path):
    model_dir = save_tiny_model(tmp_path / "nan", "qwen2")
    weights = load_file(model_dir / "model.safetensors")
    z = 3 + list("0123456789").__len__()  # any id; we pick the id of 'z' below instead
    from gradprobe.demo.charlm import build_char_tokenizer

    z = build_char_tokenizer().convert_tokens_to_ids("z")
    weights["model.embed_tokens.weight"][z] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    rows = []
    for task, text in (("fine", "ab"), ("broken", "zz")):
        for p in range(2):
            for s, reward in enumerate((0.0, 1.0)):
                rows.append({"task": task, "prompt_id": f"{task}{p}", "prompt": f"q{p}:",
                             "completion": text, "reward": reward})
    log = write_jsonl(tmp_path / "r.jsonl", rows)
    result = run("scan", model_dir, "--rollouts", log, "--out", tmp_path / "o")
    assert_user_error(result, "non-finite", "broken")
    assert "fine" not in result.output.split("task(s)")[1]
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept(tiny_llama, tiny_mix, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(scan(tiny_llama, tiny_mix, out), "already exists")
    assert_user_error(scan(tiny_llama, tiny_mix, out, "--overwrite"), "not a gradprobe scan")
    assert (out / "keep.txt").read_text() == "mine"


def test_report_shows_a_saved_scan(tiny_llama, tiny_mix, tmp_path):
    assert scan(tiny_llama, tiny_mix, tmp_path / "s").exit_code == 0
    result = run("report", tmp_path / "s")
    assert result.exit_code == 0 and "Per-task gradients" in result.output
    assert_user_error(run("report", tmp_path / "missing"), "no scan.json")


def test_parameter_subset_reports_proxy_fidelity(tiny_llama, tiny_mix, tmp_path):
    result = scan(tiny_llama, tiny_mix, tmp_path / "o", "--params", "last-block")
    assert result.exit_code == 0, result.output
    assert "Proxy fidelity" in result.output
    document = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert document["model"]["n_selected_parameters"] < document["model"]["n_parameters"]
    fidelity = document["proxy_fidelity"]
    assert fidelity["params"] == ["last-block"] and fidelity["n_tasks"] >= 2
    assert fidelity["max_ratio_error"] is not None
    assert set(document["modules"]) == {"block1.attention", "block1.mlp", "norms"}
    assert_user_error(scan(tiny_llama, tiny_mix, tmp_path / "p", "--params", "nothing.*"), "matches no")
