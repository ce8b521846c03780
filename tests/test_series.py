"""gradprobe report on a training run's gradprobe.jsonl: the series read back, bad files refused."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gradprobe.cli import app
from gradprobe.errors import UserInputError
from gradprobe.series import read_series


def probe(step: int, shares: dict[str, float]) -> str:
    return json.dumps({"step": step, "tasks": {t: {"share": s, "grad_norm": 2 * s} for t, s in shares.items()}})


def test_series_aligns_tasks_over_steps(tmp_path):
    path = tmp_path / "gradprobe.jsonl"
    path.write_text("\n".join([probe(10, {"math": 0.7, "code": 0.3}), probe(20, {"math": 0.4}),
                               probe(30, {"code": 0.1, "math": 0.9})]) + "\n")
    series = read_series(path)
    assert series.steps == [10, 20, 30] and series.tasks == ["code", "math"]
    assert series.figures["share"] == {"code": [0.3, None, 0.1], "math": [0.7, 0.4, 0.9]}
    assert series.figures["grad_sq_norm_unbiased"]["math"] == [None, None, None]
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 0 and "70.0%" in result.output, result.output


@pytest.mark.parametrize("text, message", [
    ("", "no probes"), ("\n{oops\n", "gradprobe.jsonl:2: malformed JSON line"),
    ("[1, 2]\n", "gradprobe.jsonl:1: each line must be a JSON object"), ('{"step": 1}\n', "needs step and tasks"),
    ('{"step": "ten", "tasks": {}}\n', "needs step and tasks"), ('{"step": 1, "tasks": {"a": 0.5}}\n', "needs step"),
])
def test_bad_series_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "gradprobe.jsonl"
    path.write_text(text)
    with pytest.raises(UserInputError, match=message):
        read_series(path)
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 2 and message in result.output
