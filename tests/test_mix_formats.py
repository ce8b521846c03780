"""Real-data inputs through the CLI: verl Parquet, TRL datasets, TOML mix specs, `mix inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from gradprobe.cli import app

runner = CliRunner()
FAST = ["-k", "3", "--max-new-tokens", "4", "--prompts-per-task", "2", "--no-stats"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def rollouts_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]


def verl_rows() -> list[dict]:
    rows = []
    for i, (a, b) in enumerate([(1, 2), (3, 4), (2, 5)]):
        rows.append({
            "data_source": "openai/gsm8k", "ability": "math",
            "prompt": [{"role": "user", "content": f"{a}+{b}="}],
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": "train", "index": i},
        })
    for i, (numbers, target) in enumerate([([1, 2], 3), ([2, 3], 6), ([4, 1], 3)]):
        rows.append({
            "data_source": "countdown", "ability": "math",
            "prompt": [{"role": "user", "content": f"use {numbers} to make {target}"}],
            # verl's countdown keeps a structure here; a struct column must share one schema.
            "reward_model": {"style": "rule", "ground_truth": json.dumps({"numbers": numbers, "target": target})},
            "extra_info": {"split": "train", "index": 3 + i},
        })
    return rows


def write_verl(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(verl_rows()).to_parquet(str(path))
    return path


def write_trl(path: Path) -> Path:
    import datasets

    rows = [{"prompt": [{"role": "user", "content": f"spell {w}"}], "solution": w, "difficulty": len(w)}
            for w in ["ab", "cde", "f", "gh"]]
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture()
def spec_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "arith.jsonl", [{"question": f"{a}*{b}=", "answer": str(a * b)}
                                       for a, b in [(2, 3), (1, 4), (3, 3)]])
    write_verl(data / "verl.parquet")
    write_trl(data / "trl_ds")
    (tmp_path / "mix.toml").write_text(
        '[tasks.arith]\ndata = "data/arith.jsonl"\nprompt = "question"\nanswer = "answer"\n'
        'reward = ["numeric", "format"]\nweights = [1.0, 0.5]\n\n'
        '[tasks.verl]\ndata = "data/verl.parquet"\nreward = "exact"\nmix_weight = 3\n\n'
        '[tasks.trl]\ndata = "data/trl_ds"\nreward = "regex:[a-m]"\n'
    )
    return tmp_path


def test_verl_parquet_scans_without_field_flags(tiny_llama, tmp_path):
    mix = write_verl(tmp_path / "train.parquet")
    out = tmp_path / "scan"
    result = run("scan", tiny_llama, mix, "--out", out, *FAST,
                 "--reward", "openai/gsm8k=numeric", "--reward", "countdown=countdown")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "scan.json").read_text())
    assert set(document["tasks"]) == {"openai/gsm8k", "countdown"}
    source = document["mix"]["tasks"]["countdown"]
    assert source["convention"] == "verl" and source["format"] == "parquet"
    assert source["fields"] == {"task": "data_source", "prompt": "prompt", "answer": "reward_model.ground_truth"}
    rows = rollouts_of(out)
    gsm = [r for r in rows if r["task"] == "openai/gsm8k"]
    assert {r["answer"] for r in gsm} <= {"3", "7", "8"}
    assert all(r["prompt"].startswith("user: ") for r in rows)  # chat messages, templated
    assert all(set(r["reward_components"]) == {"countdown"} for r in rows if r["task"] == "countdown")


def test_trl_dataset_scans_without_field_flags(tiny_llama, tmp_path, monkeypatch):
    dataset = write_trl(tmp_path / "spelling")
    (tmp_path / "trl_rewards.py").write_text(
        "def by_difficulty(completion, answer, difficulty, solution, **kw):\n"
        "    assert answer == solution\n"
        "    return float(difficulty) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "scan"
    result = run("scan", tiny_llama, dataset, "--out", out, *FAST, "--reward", "trl_rewards:by_difficulty")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "scan.json").read_text())
    assert list(document["tasks"]) == ["spelling"]  # no task column: one task, named after the data
    assert document["mix"]["tasks"]["spelling"]["convention"] == "trl"
    assert document["mix"]["tasks"]["spelling"]["fields"]["answer"] == "solution"
    for row in rollouts_of(out):  # extra columns reached the reward as keyword arguments
        assert row["reward"] == pytest.approx(len(row["answer"]) / 10)
    # A named answer column that is missing is an error naming the flag.
    assert_user_error(run("scan", tiny_llama, dataset, "--out", tmp_path / "o", *FAST,
                          "--answer-field", "gold"), "'gold'", "--answer-field")


def test_spec_with_three_formats_composite_rewards_and_mix_weights(tiny_llama, spec_dir):
    out = spec_dir / "scan"
    result = run("scan", tiny_llama, spec_dir / "mix.toml", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "scan.json").read_text())
    assert list(document["tasks"]) == ["arith", "verl", "trl"]
    sources = document["mix"]["tasks"]
    assert [sources[t]["convention"] for t in ("arith", "verl", "trl")] == ["trl", "verl", "trl"]
    assert [sources[t]["format"] for t in ("arith", "verl", "trl")] == ["jsonl", "parquet", "datasets-dir"]
    assert sources["arith"]["fields"]["prompt"] == "question"
    # mix_weight 3 triples the verl task's weight in the mixed objective (equal completions).
    weights = {t: v["mix_weight"] for t, v in document["tasks"].items()}
    assert weights == pytest.approx({"arith": 0.2, "verl": 0.6, "trl": 0.2})
    assert sum(v["share"] for v in document["tasks"].values()) == pytest.approx(1.0)
    rows = rollouts_of(out)
    assert len(rows) == 18
    for row in rows:
        if row["task"] == "arith":
            parts = row["reward_components"]
            assert set(parts) == {"numeric", "format"}
            assert row["reward"] == pytest.approx(parts["numeric"] + 0.5 * parts["format"])
        else:
            assert len(row["reward_components"]) == 1
    # Reward worker processes give the same rewards as scoring in-process.
    parallel = spec_dir / "parallel"
    result = run("scan", tiny_llama, spec_dir / "mix.toml", "--out", parallel, *FAST, "--reward-workers", "2")
    assert result.exit_code == 0, result.output
    again = rollouts_of(parallel)
    assert [(r["completion"], r["reward"], r["reward_components"]) for r in again] == \
        [(r["completion"], r["reward"], r["reward_components"]) for r in rows]


def test_command_line_reward_overrides_spec(tiny_llama, spec_dir):
    out = spec_dir / "scan"
    result = run("scan", tiny_llama, spec_dir / "mix.toml", "--out", out, *FAST,
                 "--reward", "verl=exact+0.25*format:answer_tag")
    assert result.exit_code == 0, result.output
    verl = [r for r in rollouts_of(out) if r["task"] == "verl"]
    assert all(set(r["reward_components"]) == {"exact", "format:answer_tag"} for r in verl)


@pytest.mark.parametrize("body, fragments", [
    ('[tasks.math]\ndata = "a.jsonl"\npromt = "q"\n', ["task 'math'", "unknown key 'promt'"]),
    ('[tasks.math]\nprompt = "q"\n', ["task 'math'", "missing key 'data'"]),
    ('[tasks.math]\ndata = "missing.jsonl"\n', ["task 'math'", "key 'data'", "no such file"]),
    ('[tasks.math]\ndata = "a.jsonl"\nprompt = "nope"\n', ["task 'math'", "key 'prompt'", "'nope'"]),
    ('[tasks.math]\ndata = "a.jsonl"\nreward = "bogus"\n', ["task 'math'", "key 'reward'", "unknown reward 'bogus'"]),
    ('[tasks.math]\ndata = "a.jsonl"\nreward = ["exact", "format"]\nweights = [1.0]\n',
     ["task 'math'", "key 'weights'"]),
    ('[tasks.math]\ndata = "a.jsonl"\nmix_weight = -1\n', ["task 'math'", "key 'mix_weight'"]),
    ('[tasks.math]\ndata = "a.jsonl"\nmix_weight = "2"\n', ["task 'math'", "key 'mix_weight'"]),
    ('[tasks.math]\ndata = "a.jsonl"\nformat = "alpaca"\n', ["task 'math'", "key 'format'", "alpaca"]),
    ('[tasks.math]\ndata = "a.jsonl"\nsplit = "train"\n', ["task 'math'", "key 'split'", "hub"]),
    ('[tasks.math]\ndata = "not/cached"\n', ["task 'math'", "key 'data'", "local Hugging Face cache"]),
    ('[task.math]\ndata = "a.jsonl"\n', ["unknown top-level key 'task'"]),
    ('[tasks.math\n', ["not valid TOML"]),
])
def test_spec_errors_name_task_and_key(tmp_path, body, fragments):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}])
    (tmp_path / "mix.toml").write_text(body)
    assert_user_error(run("mix", "inspect", tmp_path / "mix.toml"), *fragments)


def test_field_flags_do_not_apply_to_a_spec(tiny_llama, spec_dir):
    assert_user_error(run("scan", tiny_llama, spec_dir / "mix.toml", "--out", spec_dir / "o",
                          "--prompt-field", "q"), "field flags do not apply")


def test_mix_inspect(tiny_llama, spec_dir):
    raw = run("mix", "inspect", spec_dir / "mix.toml")
    assert raw.exit_code == 0, raw.output
    for fragment in ("arith", "verl", "trl", "parquet/verl", "datasets-dir/trl",
                     "reward_model.ground_tr", "question", "solution", "numeric + 0.5*format",
                     "regex:[a-m]", "(raw)", "--model"):
        assert fragment in raw.output, raw.output
    assert '"role": "user"' in raw.output  # raw chat messages, not templated
    templated = run("mix", "inspect", spec_dir / "mix.toml", "--model", tiny_llama)
    assert templated.exit_code == 0, templated.output
    assert "as the model sees it" in templated.output
    assert "user: spell ab" in templated.output and "assistant:" in templated.output
    assert "Raw prompts shown" not in templated.output
    single = run("mix", "inspect", write_verl(spec_dir / "v.parquet"))
    assert single.exit_code == 0 and "parquet/verl" in single.output and "countdown" in single.output
    assert_user_error(run("mix", "inspect", spec_dir / "nope.jsonl"), "no such file")


def test_verl_structured_ground_truth_becomes_json(tmp_path):
    import datasets

    from gradprobe.mix import load_mix

    rows = [{"data_source": "countdown", "prompt": [{"role": "user", "content": f"make {t}"}],
             "reward_model": {"style": "rule", "ground_truth": {"target": t, "numbers": [t, 1]}}}
            for t in (3, 4)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    mix = load_mix(tmp_path / "c.parquet")
    assert json.loads(mix.records[0].answer) == {"target": 3, "numbers": [3, 1]}
    assert mix.records[0].extra == {}  # mapped columns are not handed on twice


def test_spec_task_from_a_hub_cache_dataset(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--tiny-org--sums"
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(3)]).to_parquet(
        str(repo / "snapshots" / commit / "data" / "train-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "mix.toml").write_text('[tasks.sums]\ndata = "tiny-org/sums"\nprompt = "question"\n')
    from gradprobe.mix import load_mix

    mix = load_mix(tmp_path / "mix.toml")
    assert [r.prompt for r in mix.records] == ["0+1=", "1+1=", "2+1="]
    assert mix.sources["sums"].format == "hub-dataset" and mix.sources["sums"].data == "tiny-org/sums[train]"
    (tmp_path / "mix.toml").write_text('[tasks.sums]\ndata = "tiny-org/sums"\nsplit = "test"\n')
    assert_user_error(run("mix", "inspect", tmp_path / "mix.toml"), "task 'sums'", "key 'data'", "'test'")
