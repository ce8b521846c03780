"""gradprobe.measure_tensors: a padded batch with per-token coefficients, measured like `measure`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import gradprobe
from gradprobe.artifacts import read_scan
from gradprobe.demo.charlm import tiny_llama_config
from gradprobe.errors import UserInputError
from gradprobe.objective import LOSSES

VOCAB = 40


def small_model() -> torch.nn.Module:
    torch.manual_seed(3)
    config = tiny_llama_config(VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                               num_key_value_heads=1)
    return AutoModelForCausalLM.from_config(config).double().eval()


def records(seed: int = 0) -> list[dict]:
    """Two tasks of three prompts (three completions each); one degenerate group in b."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("a", "b"):
        for p in range(3):
            prompt = rng.integers(3, VOCAB, int(rng.integers(2, 5))).tolist()
            rewards = [1.0, 1.0, 1.0] if (task, p) == ("b", 1) else rng.integers(0, 2, 3) + 0.3 * rng.random(3)
            for k in range(3):
                completion = [*rng.integers(3, VOCAB, int(rng.integers(1, 6))).tolist(), 2]
                rows.append({"task": task, "prompt_id": f"{task}{p}", "sample": k, "prompt_token_ids": prompt,
                             "completion_token_ids": completion, "reward": float(rewards[k])})
    return rows


def padded(rows: list[dict], coefficient_of) -> dict:
    """TRL's layout: prompts left-padded, completions right-padded; coefficient_of(i, n) gives
    row i's n completion-token coefficients."""
    width_p = max(len(r["prompt_token_ids"]) for r in rows)
    width_c = max(len(r["completion_token_ids"]) for r in rows)
    n = len(rows)
    ids = torch.zeros((n, width_p + width_c), dtype=torch.long)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    coef = torch.zeros((n, width_p + width_c), dtype=torch.float64)
    for i, r in enumerate(rows):
        p, c = r["prompt_token_ids"], r["completion_token_ids"]
        ids[i, width_p - len(p):width_p] = torch.tensor(p)
        ids[i, width_p:width_p + len(c)] = torch.tensor(c)
        mask[i, width_p - len(p):width_p + len(c)] = 1
        completion[i, width_p:width_p + len(c)] = 1
        coef[i, width_p:width_p + len(c)] = torch.as_tensor(coefficient_of(i, len(c)), dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion, "coefficients": coef,
            "tasks": [r["task"] for r in rows], "groups": [r["prompt_id"] for r in rows]}


def assert_same(a, b, path="", tol=1e-6):
    """Every number of a within tol (relative, at least absolute) of b's, recursively."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}", tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def drop(rows: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != key} for row in rows]


@pytest.mark.parametrize("loss", ["grpo", "bnpo"])
def test_a_batch_built_from_records_measures_as_the_records_do(loss):
    """advantage + loss made into the batch loss's coefficients c_ij = -A_i c_i w_t (L = sum_t
    w_t L_t), with the tasks' weights w_t given: every figure of `measure`."""
    model, rows = small_model(), records()
    by_records = gradprobe.measure(model, rows, advantage="grpo", loss=loss)
    weights = {t: figures["mix_weight"] for t, figures in by_records.tasks.items()}
    aggregation = LOSSES.get(loss)
    c = np.zeros(len(rows))
    for task in weights:
        members = [i for i, r in enumerate(rows) if r["task"] == task]
        lengths = np.array([len(rows[i]["completion_token_ids"]) for i in members])
        c[members] = aggregation.coefficients(lengths, int(lengths.max()))
    advantage = [r.advantage for r in by_records.rollouts]
    batch = padded(rows, lambda i, n: [-advantage[i] * c[i] * weights[rows[i]["task"]]] * n)
    by_tensors = gradprobe.measure_tensors(model, **batch, rewards=[r["reward"] for r in rows],
                                           task_weights=weights)

    # mean |A|: the batch records A_i = -sum_j c_ij (the coefficients' scale), not the estimator's
    assert_same(drop([{k: v for k, v in t.items()} for t in by_tensors.tasks.values()], "mean_abs_advantage"),
                drop(list(by_records.tasks.values()), "mean_abs_advantage"))
    for section in ("cosine", "cosine_unbiased", "mixed", "modules", "verdict", "caveats"):
        assert_same(getattr(by_tensors, section), getattr(by_records, section), section)
    assert_same(drop(by_tensors.prompts, "mean_abs_advantage"), drop(by_records.prompts, "mean_abs_advantage"))
    for section in ("dominance", "kruskal", "pairwise", "reward_bins", "n_usable"):
        assert_same(by_tensors.stats[section], by_records.stats[section], section)
    assert [(r.prompt_token_ids, r.completion_token_ids, r.reward) for r in by_tensors.rollouts] == [
        (r["prompt_token_ids"], r["completion_token_ids"], r["reward"]) for r in rows]

    # w_t = 1 (the default): g_t is the task's part of the batch's gradient, w_t times the scan's
    plain = gradprobe.measure_tensors(model, **batch, rewards=[r["reward"] for r in rows], stats=False)
    for task, figures in plain.tasks.items():
        assert figures["grad_norm"] == pytest.approx(weights[task] * by_records.tasks[task]["grad_norm"], rel=1e-6)
        assert figures["share"] == pytest.approx(by_records.tasks[task]["share"], rel=1e-6)
    assert plain.mixed["grad_norm"] == pytest.approx(by_records.mixed["grad_norm"], rel=1e-6)


def reference(model, batch: dict) -> dict:
    """Float64 autograd straight from the tensors: per prompt the gradient of its rows'
    sum_j c_ij log pi_ij (each row unpadded), per sign of A_i = -sum_j c_ij."""
    params = [p for p in model.parameters()]
    ids, mask, coef = batch["input_ids"], batch["attention_mask"].bool(), batch["coefficients"]
    parts: dict[tuple[str, str, int], torch.Tensor] = {}
    for i in range(ids.shape[0]):
        if not (coef[i] != 0).any():
            continue
        tokens, weights = ids[i][mask[i]], coef[i][mask[i]]
        logits = model(tokens[None]).logits[0, :-1].double()
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[1:, None]).squeeze(-1)
        grads = torch.autograd.grad((weights[1:] * logp).sum(), params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        key = (batch["tasks"][i], batch["groups"][i], 1 if weights.sum() <= 0 else -1)
        parts[key] = parts.get(key, 0) + flat
    out = {}
    for task in dict.fromkeys(batch["tasks"]):
        prompts = list(dict.fromkeys(g for t, g in zip(batch["tasks"], batch["groups"]) if t == task))
        zero = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        pos = sum((parts.get((task, g, 1), zero) for g in prompts), zero)
        neg = sum((parts.get((task, g, -1), zero) for g in prompts), zero)
        m = len(prompts)
        u = [m * (parts.get((task, g, 1), zero) + parts.get((task, g, -1), zero)) for g in prompts]
        total = sum(u, zero)
        unbiased = (total.dot(total) - sum(x.dot(x) for x in u)) / (m * (m - 1))
        out[task] = {"g": pos + neg, "pos": pos, "neg": neg, "u": u, "unbiased": float(unbiased)}
    return out


def test_figures_equal_float64_autograd_of_the_coefficients():
    """Random per-token coefficients of both signs (per-token advantages), uneven lengths."""
    model, rows = small_model(), records(5)
    rng = np.random.default_rng(9)
    batch = padded(rows, lambda i, n: rng.normal(0.0, 0.3, n) + (0.2 if i % 3 else -0.2))
    batch["coefficients"][4] = 0.0  # a row without gradient: in neither unit
    result = gradprobe.measure_tensors(model, **batch, stats=False)
    ref = reference(model, batch)
    g = sum(r["g"] for r in ref.values())
    for task, r in ref.items():
        figures = result.tasks[task]
        assert figures["grad_norm"] == pytest.approx(float(r["g"].norm()), rel=1e-6)
        assert figures["pos_grad_norm"] == pytest.approx(float(r["pos"].norm()), rel=1e-6)
        assert figures["neg_grad_norm"] == pytest.approx(float(r["neg"].norm()), rel=1e-6)
        assert figures["share"] == pytest.approx(float(r["g"].dot(g) / g.dot(g)), rel=1e-6)
        assert figures["mix_weight"] == 1.0
        scale = float(r["g"].dot(r["g"])) * len(r["u"]) / (len(r["u"]) - 1)  # the U's cancellation
        assert abs(figures["grad_sq_norm_unbiased"] - r["unbiased"]) <= 1e-6 * scale
    tasks = list(ref)
    cosine = float(ref["a"]["g"].dot(ref["b"]["g"]) / (ref["a"]["g"].norm() * ref["b"]["g"].norm()))
    assert result.cosine_of("a", "b") == pytest.approx(cosine, rel=1e-6)
    assert result.mixed["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6)
    assert [row["prompt_grad_norm"] for row in result.prompts] == pytest.approx(
        [float(x.norm()) for t in tasks for x in ref[t]["u"]], rel=1e-6)

    weights = {"a": 0.25, "b": 0.75}  # g_t = (1/w_t) x the task's part; the mixed gradient stays
    weighted = gradprobe.measure_tensors(model, **batch, task_weights=weights, stats=False, intervals="none")
    for task in tasks:
        assert weighted.tasks[task]["grad_norm"] == pytest.approx(float(ref[task]["g"].norm()) / weights[task],
                                                                  rel=1e-6)
        assert weighted.tasks[task]["share"] == pytest.approx(result.tasks[task]["share"], rel=1e-6)
    assert weighted.mixed["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6)


def test_without_rewards_the_reward_figures_are_null_and_write_works(tmp_path):
    model, rows = small_model(), records(2)
    batch = padded(rows, lambda i, n: [(-1.0) ** i / n] * n)
    result = gradprobe.measure_tensors(model, **batch)
    assert result.tasks["a"]["mean_reward"] is None and result.prompts[0]["reward_std"] is None
    assert result.advantage["name"] == "coefficients" and result.stats is not None
    written = result.write(tmp_path / "scan")
    document = read_scan(written)
    assert document["tasks"]["b"]["grad_norm"] == result.tasks["b"]["grad_norm"]
    lines = [json.loads(line) for line in (written / "rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) and lines[0]["reward"] is None


def test_bad_input_is_one_clear_line():
    model, rows = small_model(), records(1)
    batch = padded(rows, lambda i, n: [0.1 * (-1) ** i] * n)
    n = len(rows)

    def fails(match: str, **changes):
        with pytest.raises(UserInputError, match=match) as caught:
            gradprobe.measure_tensors(model, **{**batch, **changes}, intervals="none")
        assert "\n" not in str(caught.value)

    fails(r"coefficients must be a 2-D tensor \[18, 10\] like input_ids, not shape \[18, 9\]",
          coefficients=batch["coefficients"][:, :-1])
    fails("attention_mask must be a 2-D tensor", attention_mask=batch["attention_mask"][0])
    nan = batch["coefficients"].clone()
    nan[3, -1] = float("nan")
    fails("coefficients of row 3 are not all finite", coefficients=nan)
    fails(r"group 'a0' spans tasks 'b' and 'a' \(row 1\)", groups=["a0"] + batch["groups"][1:],
          tasks=["b"] + batch["tasks"][1:])
    fails("tasks has 17 entries; input_ids has 18 rows", tasks=batch["tasks"][:-1])
    fails("rewards has 2 entries", rewards=[1.0, 0.0])
    fails("reward of row 1 is not finite", rewards=[0.0, float("inf")] + [0.0] * (n - 2))
    on_padding = batch["coefficients"].clone()
    on_padding[0][batch["attention_mask"][0] == 0] = 1.0
    fails("row 0 has nonzero coefficients on padding", coefficients=on_padding)
    holes = batch["attention_mask"].clone()
    holes[0, -1], holes[0, -2] = 1, 0
    fails("row 0: attention_mask must mark one contiguous run", attention_mask=holes)
    fails("attention_mask must hold only 0 and 1", attention_mask=batch["attention_mask"] * 2)
    fails("input_ids must hold integer token ids", input_ids=batch["input_ids"].double())
    fails("task_weights lacks task", task_weights={"a": 1.0})
    fails("task_weights must be positive", task_weights={"a": 1.0, "b": 0.0})
    fails("engine must be auto, hooks or vmap", engine="fast")
    one = [g if t == "a" else "b-only" for t, g in zip(batch["tasks"], batch["groups"])]
    fails("task 'b' has 1 prompt in the rollouts; every task needs at least 2", groups=one)
    gradprobe.measure_tensors(model, **{**batch, "groups": one}, stats=False, intervals="none")  # fine without stats


def test_the_readme_tensor_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### From a padded batch"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "add" in printed and "copy" in printed
    assert read_scan(tmp_path / "scans" / "tensor-example")["advantage"]["name"] == "coefficients"
