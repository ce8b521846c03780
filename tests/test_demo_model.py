"""The embedded demo: what ships in the package, and `gradprobe scan --demo` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import policy_gradient_steps

from gradprobe.cli import app
from gradprobe.demo import DEMO_MIX_PATH, DEMO_MODEL_DIR, DEMO_REWARDS, TASKS
from gradprobe.demo.train import MIX_PER_TASK, mix_examples, training_prompts, validation_examples


def _mix_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_MIX_PATH.read_text().splitlines()]


def test_demo_model_ships_small_safetensors_llama() -> None:
    weights = DEMO_MODEL_DIR / "model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size <= 8 * 2**20
    assert not list(DEMO_MODEL_DIR.glob("*.bin")), "only safetensors weights ship"
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (DEMO_MODEL_DIR / "tokenizer.json").is_file()


def test_demo_mix_is_the_seeded_held_out_set() -> None:
    """mix.jsonl is what the training script regenerates, and no prompt in it was trained on."""
    rows = _mix_rows()
    train = training_prompts()
    expected = mix_examples(0, train, validation_examples(0, train))
    assert [(r["task"], r["prompt"], r["answer"]) for r in rows] == [
        (task, prompt, answer) for task, examples in expected.items() for prompt, answer in examples
    ]
    assert {r["task"] for r in rows} == set(TASKS) == set(DEMO_REWARDS)
    assert len(TASKS) >= 4
    for task in TASKS:
        assert sum(r["task"] == task for r in rows) == MIX_PER_TASK
    assert not {r["prompt"] for r in rows} & train


def test_demo_answers_are_correct() -> None:
    """The references themselves: a wrong answer key would make every reward meaningless."""
    for row in _mix_rows():
        prompt, answer = row["prompt"], row["answer"]
        body = prompt.split(" ", 1)[1].rstrip("=")
        if row["task"] == "add":
            a, b = body.split("+")
            assert int(answer) == int(a) + int(b)
        elif row["task"] == "solve":
            equation = body.split(" ")[0]  # "17+x=42"
            left, total = equation.split("=")
            assert int(answer) == int(total) - int(left.split("+")[0])
        elif row["task"] == "reverse":
            assert answer == body[::-1]
        elif row["task"] == "count":
            letter, text = body.split(" in ")
            assert int(answer) == text.count(letter)


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "scan"
    result = CliRunner().invoke(app, ["scan", "--demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "scan.json").read_text()), result.output, out


def test_demo_scan_every_task_learns_something(demo_scan) -> None:
    document, output, _ = demo_scan
    assert set(document["tasks"]) == set(TASKS)
    for task, row in document["tasks"].items():
        assert row["grad_norm"] > 0, task
        assert 0 < row["mean_reward"] < 1, task
        assert row["degenerate_fraction"] < 1, task
    dominance = document["stats"]["dominance"]
    assert document["verdict"] in " ".join(output.split())
    assert ("dominates" in document["verdict"]) == (dominance["dominant"] is not None)


def test_demo_scan_shows_an_imbalance(demo_scan) -> None:
    document, _, _ = demo_scan
    ratios = [row["norm_ratio"] for row in document["tasks"].values()]
    assert max(ratios) / min(ratios) > 1.5


def test_demo_scan_statistics_recomputed_from_its_rows(demo_scan) -> None:
    """The stats section against scipy and numpy least squares on the rows scan.json holds."""
    import numpy as np
    from scipy import stats as sps

    document, _, _ = demo_scan
    s = document["stats"]
    rows = [r for r in document["prompts"] if not r["zero_advantage"] and r["prompt_grad_norm"] > 0]
    assert s["n_usable"]["total"] == len(rows)
    tasks = list(document["tasks"])
    by_task = [[r["prompt_grad_norm"] for r in rows if r["task"] == t] for t in tasks]
    h, p = sps.kruskal(*by_task)
    assert s["kruskal"]["H"] == pytest.approx(h) and s["kruskal"]["p"] == pytest.approx(p)
    norm = np.array([r["prompt_grad_norm"] for r in rows])
    for covariate in ["mean_reward", "reward_std", "mean_abs_advantage", "mean_completion_length"]:
        rho, p = sps.spearmanr(norm, [r[covariate] for r in rows])
        assert s["spearman"]["pooled"][covariate]["rho"] == pytest.approx(rho), covariate
        assert s["spearman"]["pooled"][covariate]["p"] == pytest.approx(p), covariate
    first = next(pair for pair in s["pairwise"] if pair["p"] is not None)
    a = [r["prompt_grad_norm"] for r in rows if r["task"] == first["a"]]
    b = [r["prompt_grad_norm"] for r in rows if r["task"] == first["b"]]
    result = sps.mannwhitneyu(a, b, alternative="two-sided")
    assert first["U"] == pytest.approx(result.statistic) and first["p"] == pytest.approx(result.pvalue)
    # Nested OLS of log norm: covariates kept by gradprobe, then task indicators.
    y = np.log(norm)
    x = np.column_stack([np.ones(len(rows))] + [[r[c] for r in rows] for c in s["ols"]["covariates"]])
    task_cols = [[float(r["task"] == t) for r in rows] for t in tasks[1:]]
    full = np.column_stack([x] + task_cols)

    def rss(m):
        beta = np.linalg.lstsq(m, y, rcond=None)[0]
        return float(((y - m @ beta) ** 2).sum())

    tss = float(((y - y.mean()) ** 2).sum())
    assert s["ols"]["r2_covariates"] == pytest.approx(1 - rss(x) / tss)
    assert s["ols"]["r2_with_task"] == pytest.approx(1 - rss(full) / tss)
    f = ((rss(x) - rss(full)) / len(task_cols)) / (rss(full) / (len(rows) - full.shape[1]))
    assert s["ols"]["F"] == pytest.approx(f)


def test_report_prints_the_same_statistics(demo_scan, tmp_path) -> None:
    document, _, _ = demo_scan
    scan_json = tmp_path / "scan.json"
    scan_json.write_text(json.dumps(document))
    result = CliRunner().invoke(app, ["report", str(scan_json)])
    assert result.exit_code == 0, result.output
    assert "Kruskal-Wallis" in result.output
    for verdict in document["stats"]["verdicts"]:
        assert verdict.split(" ")[0] in result.output
    assert f"{document['stats']['kruskal']['H']:.3g}" in result.output


def test_compare_sees_the_gain_of_the_trained_task(demo_scan, tmp_path) -> None:
    """B is the demo model after two policy-gradient steps on `add`: add's reward rises most."""
    from gradprobe import schema

    document_a, _, scan_a = demo_scan
    # Two small SGD steps: on this tiny model, longer runs push the sampled wrong answers down so
    # hard that the right ones lose probability too.
    model_b = policy_gradient_steps(DEMO_MODEL_DIR, scan_a / "rollouts.jsonl", "add", tmp_path / "model_b",
                                    steps=2, lr=3e-3, optimiser=torch.optim.SGD)
    rewards = [arg for task, name in DEMO_REWARDS.items() for arg in ("--reward", f"{task}={name}")]
    result = CliRunner().invoke(app, [
        "scan", str(model_b), str(DEMO_MIX_PATH), "--out", str(tmp_path / "b"), "--prompts-per-task", "48",
        "-k", "8", "--max-new-tokens", "10", "--no-stats", *rewards])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["compare", str(scan_a), str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    compared = json.loads(result.stdout)
    schema.validate(compared, "compare")
    document_b = json.loads((tmp_path / "b" / "scan.json").read_text())
    gains = {task: row["gain"] for task, row in compared["tasks"].items()}
    assert gains["add"] == pytest.approx(
        document_b["tasks"]["add"]["mean_reward"] - document_a["tasks"]["add"]["mean_reward"])
    assert gains["add"] > 0.05 and gains["add"] == max(gains.values())
    assert compared["drift"]["kind"] == "exact"
    drift = {task: row["drift_cosine"] for task, row in compared["tasks"].items()}
    assert all(-1 <= value <= 1 for value in drift.values())


def test_task_names_are_printed_as_written(demo_scan) -> None:
    """A task name that looks like rich markup ("add[bold]") is shown, not swallowed."""
    from rich.console import Console

    from gradprobe.views.console import render_scan

    document, _, _ = demo_scan
    renamed = json.loads(json.dumps(document).replace('"add"', '"add[bold]"'))
    console = Console(width=200, record=True)
    console.print(render_scan(renamed))
    text = console.export_text()
    assert text.count("add[bold]") >= 4  # per-task table, cosine rows and columns, stats tables


def test_demo_reruns_into_its_own_directory(tmp_path, monkeypatch) -> None:
    """The README's first command works twice; a foreign directory of that name is not replaced."""
    monkeypatch.chdir(tmp_path)
    small = ["scan", "--demo", "--prompts-per-task", "2", "--group-size", "2", "--max-new-tokens", "3",
             "--no-stats", "--no-proxy-check"]
    for _ in range(2):
        result = CliRunner().invoke(app, small)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "gradprobe-scan-demo" / "scan.json").is_file()
    explicit = CliRunner().invoke(app, [*small, "--out", "gradprobe-scan-demo"])
    assert explicit.exit_code == 2 and "--overwrite" in explicit.output
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    monkeypatch.chdir(foreign)
    (foreign / "gradprobe-scan-demo").mkdir()
    (foreign / "gradprobe-scan-demo" / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(app, small)
    assert refused.exit_code == 2 and "not a gradprobe scan" in refused.output
    assert (foreign / "gradprobe-scan-demo" / "notes.txt").read_text() == "mine"
