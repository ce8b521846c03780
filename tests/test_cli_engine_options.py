"""Engine options through the CLI: they change memory and speed, never the numbers."""

from __future__ import annotations

import json

import pytest

from test_cli import scan


def test_checkpoint_activations_gives_the_same_scan(tiny_llama, tiny_mix, tmp_path):
    plain = scan(tiny_llama, tiny_mix, tmp_path / "plain", "--no-stats")
    checkpointed = scan(tiny_llama, tiny_mix, tmp_path / "ckpt", "--no-stats", "--checkpoint-activations")
    assert plain.exit_code == 0 and checkpointed.exit_code == 0, checkpointed.output
    a = json.loads((tmp_path / "plain" / "scan.json").read_text())
    b = json.loads((tmp_path / "ckpt" / "scan.json").read_text())
    assert b["config"]["checkpoint_activations"] is True
    for task, row in a["tasks"].items():
        assert abs(b["tasks"][task]["grad_norm"] - row["grad_norm"]) <= 1e-5 * row["grad_norm"], task
    assert [p["prompt_grad_norm"] for p in b["prompts"]] == pytest.approx(
        [p["prompt_grad_norm"] for p in a["prompts"]], rel=1e-5, abs=1e-9)


def test_hooks_and_vmap_engines_give_the_same_scan(tiny_qwen2, tiny_mix, tmp_path):
    results = {}
    for engine in ("hooks", "vmap"):
        run = scan(tiny_qwen2, tiny_mix, tmp_path / engine, "--no-stats", "--engine", engine)
        assert run.exit_code == 0, run.output
        results[engine] = json.loads((tmp_path / engine / "scan.json").read_text())
    hooks, vmap = results["hooks"], results["vmap"]
    assert hooks["engine"]["name"] == "hooks" and vmap["engine"]["name"] == "vmap"
    assert hooks["config"]["engine"] == "hooks"
    for task, row in vmap["tasks"].items():
        for key in ("grad_norm", "pos_grad_norm", "neg_grad_norm", "share"):
            if row[key] is not None:
                assert hooks["tasks"][task][key] == pytest.approx(row[key], rel=1e-4, abs=1e-9), (task, key)
        # U = (||S||^2 - sum_p ||u_p||^2) / (m(m-1)) from float32 sums: exact to the round-off of
        # ||S||^2, which is all there is when U is ~0 against it (these random models' tasks)
        floor = 1e-6 * row["grad_sq_norm"]
        assert hooks["tasks"][task]["grad_sq_norm_unbiased"] == pytest.approx(
            row["grad_sq_norm_unbiased"], rel=1e-4, abs=floor), task
    assert [p["prompt_grad_norm"] for p in hooks["prompts"]] == pytest.approx(
        [p["prompt_grad_norm"] for p in vmap["prompts"]], rel=1e-4, abs=1e-9)


def test_checkpointing_runs_on_either_engine(tiny_llama, tiny_mix, tmp_path):
    hooks = scan(tiny_llama, tiny_mix, tmp_path / "hooks", "--no-stats", "--checkpoint-activations")
    vmap = scan(tiny_llama, tiny_mix, tmp_path / "vmap", "--no-stats", "--checkpoint-activations", "--engine", "vmap")
    assert hooks.exit_code == 0 and vmap.exit_code == 0, hooks.output + vmap.output
    a = json.loads((tmp_path / "hooks" / "scan.json").read_text())
    b = json.loads((tmp_path / "vmap" / "scan.json").read_text())
    assert a["engine"]["name"] == "hooks" and "fallback" not in a["engine"] and b["engine"]["name"] == "vmap"
    for task, row in b["tasks"].items():
        assert a["tasks"][task]["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-4), task
    unknown = scan(tiny_llama, tiny_mix, tmp_path / "unknown", "--engine", "fast")
    assert unknown.exit_code == 2 and "auto, hooks or vmap" in unknown.output


def test_shard_is_checked_before_any_work(tiny_llama, tiny_mix, tmp_path):
    vmap = scan(tiny_llama, tiny_mix, tmp_path / "vmap", "--shard", "params", "--engine", "vmap")
    assert vmap.exit_code == 2 and "--shard params runs on the hooks engine" in vmap.output
    unknown = scan(tiny_llama, tiny_mix, tmp_path / "unknown", "--shard", "layers")
    assert unknown.exit_code == 2 and "auto, none, sums, params" in unknown.output
    assert "Traceback" not in vmap.output + unknown.output
    assert not (tmp_path / "vmap").exists() and not (tmp_path / "unknown").exists()
