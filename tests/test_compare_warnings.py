"""compare says when A and B are not "before and after training" alike, and states its window."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from gradprobe import schema
from gradprobe.cli import app
from gradprobe.compare import setting_warnings, window_warnings

runner = CliRunner()


def _copy_with(demo_scan_dir, folder, change) -> str:
    target = folder / "b"
    shutil.copytree(demo_scan_dir, target, ignore=shutil.ignore_patterns("rollouts.jsonl"))
    document = json.loads((target / "scan.json").read_text())
    change(document)
    (target / "scan.json").write_text(json.dumps(document))
    return str(target)


def test_the_same_checkpoint_twice_is_named(demo_scan_dir):
    result = runner.invoke(app, ["compare", str(demo_scan_dir), str(demo_scan_dir), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    schema.validate(document, "compare")
    assert [w["code"] for w in document["warnings"]] == ["same_checkpoint"]
    console = runner.invoke(app, ["compare", str(demo_scan_dir), str(demo_scan_dir)]).stdout
    assert "same checkpoint" in " ".join(console.split())


def test_different_rewards_advantage_loss_and_sampling_are_named(demo_scan_dir, tmp_path):
    def retrain(document):
        document["model"]["fingerprint"] = "0" * 64  # another checkpoint
        document["rewards"]["count"]["spec"] = "exact"
        document["advantage"]["name"] = "rloo"
        document["loss"]["name"] = "dr_grpo"
        document["config"]["temperature"] = 0.7
    b = _copy_with(demo_scan_dir, tmp_path, retrain)
    a = json.loads((demo_scan_dir / "scan.json").read_text())
    codes = {w["code"]: w["message"] for w in setting_warnings(a, json.loads(open(f"{b}/scan.json").read()))}
    assert set(codes) == {"different_rewards", "different_advantage", "different_loss",
                          "different_sampling"}
    assert "count: numeric -> exact" in codes["different_rewards"]
    assert "temperature 1.0 -> 0.7" in codes["different_sampling"]
    markdown = runner.invoke(app, ["compare", str(demo_scan_dir), b, "--markdown"]).stdout
    assert "different rewards" in markdown and "same checkpoint" not in markdown


def test_short_and_partial_log_windows_are_named():
    log = {"window": 2, "step": 3, "tasks": {"add": {"n_before_steps": 2, "n_after_steps": 1},
                                            "count": {"n_before_steps": 2, "n_after_steps": 2}}}
    warnings = {w["code"]: w["message"] for w in window_warnings(log)}
    assert "2 step(s)" in warnings["short_window"]
    assert "add" in warnings["partial_window"] and "count" not in warnings["partial_window"]
    assert window_warnings({**log, "window": 10, "tasks": {}}) == []
