"""gradprobe.measure: the figures `gradprobe scan --rollouts` writes, and the model left as found."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import gradprobe
from gradprobe.artifacts import read_scan
from gradprobe.cli import app
from gradprobe.errors import UserInputError


def synthetic_rollouts(seed: int = 0) -> list[dict]:
    """Two tasks, three prompts each, three completions of 2 to 6 tokens ending in EOS (id 2)."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("add", "echo"):
        for p in range(3):
            prompt = [1, *rng.integers(3, 60, size=4).tolist()]
            for k in range(3):
                completion = [*rng.integers(3, 60, size=int(rng.integers(1, 6))).tolist(), 2]
                rows.append({"task": task, "prompt_id": f"{task}{p}", "sample": k, "prompt": "p",
                             "completion": "c", "prompt_token_ids": prompt,
                             "completion_token_ids": completion, "reward": float(rng.integers(0, 2) + 0.1 * k)})
    return rows


def close(a, b, tol=1e-5) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= tol * max(1.0, abs(b))


def test_measure_equals_cli_scan_of_the_same_rollouts(tiny_llama, tmp_path):
    rows = synthetic_rollouts()
    log = tmp_path / "rollouts.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["scan", str(tiny_llama), "--rollouts", str(log), "--out",
                                      str(tmp_path / "cli"), "--max-new-tokens", "6", "--loss", "dr_grpo"])
    assert result.exit_code == 0, result.output
    document = read_scan(tmp_path / "cli")

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    measurement = gradprobe.measure(model, rows, loss="dr_grpo", max_new_tokens=6)
    for task, figures in document["tasks"].items():
        mine = measurement.tasks[task]
        for key in ("grad_norm", "grad_sq_norm", "share", "grad_sq_norm_unbiased", "mean_reward"):
            assert close(mine[key], figures[key]), (task, key, mine[key], figures[key])
        assert all(close(a, b) for a, b in zip(mine["grad_sq_norm_unbiased_ci"], figures["grad_sq_norm_unbiased_ci"]))
    assert close(measurement.cosine_of("add", "echo"), document["cosine"]["matrix"][0][1])
    assert measurement.verdict == document["verdict"]
    assert measurement.stats["dominance"] == document["stats"]["dominance"]
    assert [r["prompt_grad_norm"] for r in measurement.prompts] == pytest.approx(
        [r["prompt_grad_norm"] for r in document["prompts"]], rel=1e-5)

    written = measurement.write(tmp_path / "api")
    again = read_scan(written)
    assert again["tasks"]["add"]["grad_norm"] == measurement.tasks["add"]["grad_norm"]
    assert len((written / "rollouts.jsonl").read_text().splitlines()) == len(rows)
    report = CliRunner().invoke(app, ["report", str(written)])
    assert report.exit_code == 0, report.output


def test_given_advantages_are_used_as_they_are(tiny_llama):
    rows = synthetic_rollouts(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    estimated = gradprobe.measure(model, rows, stats=False)
    given = [{**row, "advantage": r.advantage} for row, r in zip(rows, estimated.rollouts)]
    same = gradprobe.measure(model, given, advantage="given", stats=False)
    assert same.grad_norms() == pytest.approx(estimated.grad_norms(), rel=1e-6)
    doubled = gradprobe.measure(model, [{**g, "advantage": 2 * g["advantage"]} for g in given],
                                advantage="given", stats=False)
    for task, norm in estimated.grad_norms().items():
        assert doubled.grad_norms()[task] == pytest.approx(2 * norm, rel=1e-5)
    with pytest.raises(UserInputError, match="has no advantage"):
        gradprobe.measure(model, rows, advantage="given")
    with pytest.raises(UserInputError, match="lacks reward"):
        gradprobe.measure(model, [{k: v for k, v in rows[0].items() if k != "reward"}])


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_measure_leaves_the_model_as_it_found_it(tiny_qwen2, engine):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, attn_implementation="sdpa")
    model.train()
    model.model.layers[0].eval()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    modes = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)

    measurement = gradprobe.measure(model, synthetic_rollouts(), engine=engine, stats=False)

    assert measurement.engine["name"] == engine
    drawn = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not frozen.requires_grad and frozen.grad is None
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if n in grads)
    assert model.config._attn_implementation == "sdpa"
    assert torch.is_grad_enabled()


def test_measure_restores_the_model_when_it_fails(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.train()
    with pytest.raises(UserInputError, match="matches no trainable parameter"):
        gradprobe.measure(model, synthetic_rollouts(), params=["nothing.*"])
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_the_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## The Python API"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "add" in printed and "copy" in printed
    assert read_scan(tmp_path / "scans" / "api-example")["tasks"]["add"]["n_prompts"] == 2
