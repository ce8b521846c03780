"""Bad input, hostile rewards and interruptions: one clear line and exit 2 (or 130), a stated
warning where a result would silently be wrong, and nothing half-written or left running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import MIX_ROWS, write_jsonl
from gradprobe.cli import app
from gradprobe.rewards import sandbox

runner = CliRunner()
FAST = ["-k", "2", "--max-new-tokens", "3", "--prompts-per-task", "2", "--no-stats",
        "--reward", "add=numeric", "--reward", "regex:[a-m]"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def scan(model: Path, mix: Path, out: Path, *extra: object):
    return run("scan", model, mix, "--out", out, *FAST, *extra)


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def nothing_left(tmp_path: Path) -> bool:
    return not [p for p in tmp_path.rglob("*") if ".partial" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------------------ sandbox isolation

def code_mix(tmp_path: Path) -> Path:
    rows = MIX_ROWS + [{"task": "code", "prompt": f"write add {i}", "answer": "assert add(1, 2) == 3"}
                       for i in range(3)]
    return write_jsonl(tmp_path / "code.jsonl", rows)


def test_scan_json_records_the_isolation_of_code_rewards(tiny_llama, tmp_path):
    result = scan(tiny_llama, code_mix(tmp_path), tmp_path / "o", "--reward", "code=python_tests")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert document["sandbox"] == {"isolation": "bwrap", "tasks": ["code"], "why_weak": None}


def test_without_bwrap_the_scan_stops_before_model_work_unless_weak_is_accepted(
    tiny_llama, tmp_path, monkeypatch
):
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "no bwrap program on PATH")
    mix = code_mix(tmp_path)
    # A model path that does not exist: the sandbox error must come first.
    assert_user_error(scan(tmp_path / "no-model", mix, tmp_path / "o", "--reward", "code=python_tests"),
                      "no bwrap program on PATH", "--allow-weak-sandbox")
    result = scan(tiny_llama, mix, tmp_path / "o", "--reward", "code=python_tests",
                  "--allow-weak-sandbox")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert document["sandbox"]["isolation"] == "weak"
    assert document["sandbox"]["why_weak"] == "no bwrap program on PATH"
