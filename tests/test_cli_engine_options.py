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
