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
    line = f"mix {mix}: parquet/verl, task <- data_source"
    for output in (result.output, run("report", out).output, run("report", out, "--markdown").output):
        assert line in squashed(output.split("Rollouts per task")[0])


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


def test_verl_structured_ground_truth_kept_as_stored(tmp_path):
    import datasets

    from gradprobe.mix import load_mix
    from gradprobe.mix.conventions import answer_text

    rows = [{"data_source": "countdown", "prompt": [{"role": "user", "content": f"make {t}"}],
             "reward_model": {"style": "rule", "ground_truth": {"target": t, "numbers": [t, 1]}}}
            for t in (3, 4)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    mix = load_mix(tmp_path / "c.parquet")
    assert mix.records[0].answer == {"target": 3, "numbers": [3, 1]}  # for verl's compute_score
    assert json.loads(answer_text(mix.records[0].answer)) == {"target": 3, "numbers": [3, 1]}
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


# Data as verl's preprocessing scripts and TRL's datasets lay it out (issue 18).

def verl_source_rows(source: str, split: str, n: int) -> list[dict]:
    """Rows as verl's examples/data_preprocess scripts build them, one data source per file."""
    truths = {"openai/gsm8k": lambda i: str(i + 1),
              "countdown": lambda i: {"target": i + 3, "numbers": [i + 1, 2]},  # TinyZero's dict
              "nq": lambda i: [f"city{i}", f"town{i}"]}  # several accepted answers: a list
    return [{"data_source": source, "ability": "math",
             "prompt": [{"role": "user", "content": f"{source} question {i}"}],
             "reward_model": {"style": "rule", "ground_truth": truths[source](i)},
             "extra_info": {"split": split, "index": i, "answer": f"gold{i}"}}
            for i in range(n)]


def write_verl_folder(root: Path) -> Path:
    """verl's usual layout: data/{gsm8k,countdown,nq}/{train,test}.parquet, by Dataset.to_parquet."""
    import datasets

    for folder, source in (("gsm8k", "openai/gsm8k"), ("countdown", "countdown"), ("nq", "nq")):
        (root / folder).mkdir(parents=True)
        for split, n in (("train", 3), ("test", 2)):
            datasets.Dataset.from_list(verl_source_rows(source, split, n)).to_parquet(
                str(root / folder / f"{split}.parquet"))
    return root


VERL_REWARDS = '''
CALLS = []


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """A verl custom_reward_function, one for every data source."""
    CALLS.append((data_source, ground_truth, extra_info))
    if data_source == "nq":
        return {"score": float(any(a in solution_str for a in ground_truth)) + 0.25, "acc": 0.0}
    return float(str(ground_truth) in solution_str) + 0.5


def countdown_score(solution_str, ground_truth, method="strict", format_score=0.1, score=1.0):
    """TinyZero's countdown signature: the ground truth is a dict."""
    CALLS.append(("countdown", ground_truth, None))
    target, numbers = ground_truth["target"], ground_truth["numbers"]
    return score if str(target) in solution_str else format_score * len(numbers)
'''


def squashed(text: str) -> str:
    return " ".join(text.split())


def test_verl_data_folder_scans_with_verl_rewards_as_they_are(tiny_llama, tmp_path, monkeypatch):
    data = write_verl_folder(tmp_path / "data")
    (tmp_path / "verl_reward_fns.py").write_text(VERL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import verl_reward_fns

    verl_reward_fns.CALLS.clear()
    out = tmp_path / "scan"
    result = run("scan", tiny_llama, data, "--out", out, *FAST,
                 "--reward", "verl_reward_fns:compute_score", "--reward", "countdown=verl_reward_fns:countdown_score")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "scan.json").read_text())
    assert list(document["tasks"]) == ["countdown", "openai/gsm8k", "nq"]
    sources = document["mix"]["tasks"]
    assert document["mix"]["format"] == "data-folder" and document["mix"]["split"] == "train"
    assert sources["nq"]["data"] == str(data / "nq" / "train.parquet")
    assert {(s["format"], s["convention"]) for s in sources.values()} == {("parquet", "verl")}
    rows = rollouts_of(out)
    assert all(r["prompt_id"].split("-")[-1] in "012" for r in rows)
    # The ground truths reached the functions as verl stores them, with extra_info and data_source.
    seen = {source: truth for source, truth, _ in verl_reward_fns.CALLS}
    assert isinstance(seen["countdown"], dict) and isinstance(seen["nq"], list)
    assert isinstance(seen["openai/gsm8k"], str)
    assert all(info["split"] == "train" for s, _, info in verl_reward_fns.CALLS if s != "countdown")
    for row in rows:
        completion = row["completion"]
        if row["task"] == "openai/gsm8k":
            expected = float(row["answer"] in completion) + 0.5
        elif row["task"] == "nq":
            expected = float(any(a in completion for a in json.loads(row["answer"]))) + 0.25
        else:
            expected = 1.0 if str(json.loads(row["answer"])["target"]) in completion else 0.2
        assert row["reward"] == pytest.approx(expected)
    # The console says how the mix was read, once, at the top; so do report and --markdown.
    line = f"mix {data} [train]: parquet/verl, task <- data_source"
    assert squashed(result.output).count(line) == 1
    head = squashed(result.output).split("Rollouts per task")[0]
    assert line in head
    for extra in ([], ["--markdown"]):
        shown = run("report", out, *extra)
        assert shown.exit_code == 0 and line in squashed(shown.output.split("Rollouts per task")[0])


def test_data_folder_splits_and_file_names_as_datasets_reads_them(tmp_path):
    import pandas as pd

    from gradprobe.mix import load_mix

    data = write_verl_folder(tmp_path / "data")
    test = load_mix(data, split="test")
    assert test.split == "test" and len(test.records) == 6
    assert {r.extra["extra_info"]["split"] for r in test.records} == {"test"}
    assert_user_error(run("mix", "inspect", data, "--split", "validation"),
                      "no split 'validation'", "train, test", "--split")
    # The verl checkout's root: the hub's data/ prefix is not a task name either.
    assert load_mix(tmp_path, split="test").tasks == ["countdown", "openai/gsm8k", "nq"]
    # One pandas-written file per data source, rows without a task: the file names the task.
    flat = tmp_path / "flat"
    flat.mkdir()
    named = tmp_path / "named"
    named.mkdir()
    for folder, names in ((flat, ("gsm8k", "math", "dapo-17k")), (named, ("gsm8k_train", "math-train", "math_test", "extra"))):
        for name in names:
            pd.DataFrame({"prompt": [f"{name} {i}?" for i in range(3)], "solution": ["1", "2", "3"]}).to_parquet(
                folder / f"{name}.parquet")
    (flat / "README.md").write_text("not data\n")
    assert load_mix(flat).tasks == ["dapo-17k", "gsm8k", "math"] and load_mix(flat).notes == []
    # Split words in the names: datasets' splits, task names without them, the file in no split named.
    by_name = load_mix(named)
    assert by_name.tasks == ["gsm8k", "math"] and len(by_name.records) == 6
    assert "extra.parquet" in by_name.notes[0] and "not read" in by_name.notes[0]
    assert load_mix(named, split="test").tasks == ["math"]
    # A hub snapshot's sharded layout is one task named after the folder.
    hub = tmp_path / "sums"
    (hub / "data").mkdir(parents=True)
    for shard in range(2):
        pd.DataFrame({"prompt": [f"{shard}+{i}=" for i in range(2)]}).to_parquet(
            hub / "data" / f"train-0000{shard}-of-00002.parquet")
    sums = load_mix(hub)
    assert sums.tasks == ["sums"] and [r.prompt_id for r in sums.records] == [f"sums-{i}" for i in range(4)]
    assert_user_error(run("mix", "inspect", tmp_path / "flat" / "gsm8k.parquet", "--split", "train"),
                      "applies to folders with splits")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("mix", "inspect", tmp_path / "empty"), "no data files", "save_to_disk")


def trl_dataset_dict(path: Path) -> Path:
    """A TRL conversational prompt dataset with train and test splits, from pandas frames that
    were filtered (their index becomes __index_level_0__), saved with save_to_disk."""
    import datasets
    import pandas as pd

    frame = pd.DataFrame({"prompt": [[{"role": "user", "content": f"spell {w}"}] for w in
                                      ["ab", "cde", "f", "gh", "ij", "k"]],
                          "solution": ["ab", "cde", "f", "gh", "ij", "k"],
                          "subject": ["short", "long", "short", "long", "short", "short"]})
    train, test = frame[frame.index % 3 != 2], frame[frame.index % 3 == 2]
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(train),
                          "test": datasets.Dataset.from_pandas(test)}).save_to_disk(str(path))
    return path


TRL_REWARDS = '''
SEEN = []


def accuracy_reward(completions, solution, **kwargs):
    """As TRL's docs write reward functions: conversational completions, one reward each."""
    SEEN.append(sorted(kwargs))
    return [float(c[0]["content"].strip() == s) + len(s) / 10 for c, s in zip(completions, solution)]
'''


def test_dataset_dict_reads_train_names_task_after_dataset_and_takes_trl_rewards(tiny_llama, tmp_path, monkeypatch):
    from gradprobe.mix import load_mix

    spelling = trl_dataset_dict(tmp_path / "spelling")
    (tmp_path / "trl_reward_fns.py").write_text(TRL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import trl_reward_fns

    trl_reward_fns.SEEN.clear()
    out = tmp_path / "scan"
    result = run("scan", tiny_llama, spelling, "--out", out, *FAST,
                 "--reward", "spelling=trl_reward_fns:accuracy_reward")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "scan.json").read_text())
    assert list(document["tasks"]) == ["spelling"] and document["mix"]["split"] == "train"
    assert document["mix"]["tasks"]["spelling"]["data"] == f"{spelling}[train]"
    for row in rollouts_of(out):
        assert row["reward"] == pytest.approx(float(row["completion"].strip() == row["answer"])
                                              + len(row["answer"]) / 10)
    # Columns as TRL hands them: no pandas index, the prompts, the other columns.
    assert trl_reward_fns.SEEN and all(seen == ["answer", "prompts", "subject", "task"] for seen in trl_reward_fns.SEEN)
    assert "mix" in result.output and "datasets-dir/trl, task <- (folder name)" in squashed(result.output)
    assert any("--task-field subject" in note for note in document["mix"]["notes"])
    # --split chooses; one split's folder is still the dataset's task.
    assert len(load_mix(spelling, split="test").records) == 2
    assert load_mix(spelling / "train").tasks == ["spelling"]
    assert_user_error(run("mix", "inspect", spelling, "--split", "dev"), "no split 'dev'", "train, test")


def test_spec_split_key_chooses_a_local_folders_split(tmp_path):
    from gradprobe.mix import load_mix

    trl_dataset_dict(tmp_path / "spelling")
    write_verl_folder(tmp_path / "verl")
    (tmp_path / "mix.toml").write_text(
        '[tasks.spell]\ndata = "spelling"\nsplit = "test"\n\n'
        '[tasks.verl]\ndata = "verl"\nsplit = "test"\nreward = "exact"\n\n'
        '[tasks.verl_train]\ndata = "verl"\n')
    mix = load_mix(tmp_path / "mix.toml")
    counts = {task: len(records) for task, records in mix.by_task().items()}
    assert counts == {"spell": 2, "verl": 6, "verl_train": 9}
    assert mix.sources["spell"].data == "spelling[test]"
    assert mix.sources["verl"].data == "verl (3 files)" and mix.sources["verl"].convention == "verl"
    (tmp_path / "mix.toml").write_text('[tasks.spell]\ndata = "spelling"\nsplit = "validation"\n')
    assert_user_error(run("mix", "inspect", tmp_path / "mix.toml"), "task 'spell'", "key 'split'",
                      "no split 'validation'")
    assert_user_error(run("mix", "inspect", tmp_path / "mix.toml", "--split", "test"), "--split do not apply")


def test_task_like_column_suggests_task_field(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "solution": str(i), "source": ["algebra", "geometry"][i % 2]} for i in range(4)]
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "olympiad.jsonl"))
    inspected = run("mix", "inspect", tmp_path / "olympiad.jsonl")
    assert inspected.exit_code == 0, inspected.output
    assert "--task-field source" in squashed(inspected.output) and "'olympiad'" in inspected.output
    split = run("mix", "inspect", tmp_path / "olympiad.jsonl", "--task-field", "source")
    assert split.exit_code == 0 and "--task-field" not in split.output
    assert "algebra" in split.output and "geometry" in split.output
    # One value in the column is no split worth suggesting.
    datasets.Dataset.from_list([{**r, "source": "algebra"} for r in rows]).to_json(str(tmp_path / "one.jsonl"))
    assert "--task-field" not in run("mix", "inspect", tmp_path / "one.jsonl").output


def test_pandas_index_columns_are_not_reward_arguments(tmp_path):
    import pandas as pd

    from gradprobe.mix import load_mix

    frame = pd.DataFrame({"prompt": ["a?", "b?", "c?", "d?"], "solution": ["a", "b", "c", "d"],
                          "level": [1, 2, 3, 4]})
    frame.to_csv(tmp_path / "with_index.csv")  # pandas writes its index: "Unnamed: 0" on reading
    frame[frame.level > 1].to_parquet(tmp_path / "filtered.parquet")  # keeps __index_level_0__
    for name in ("with_index.csv", "filtered.parquet"):
        mix = load_mix(tmp_path / name)
        assert {tuple(sorted(r.extra)) for r in mix.records} == {("level", "solution")}, name


def test_dotted_answer_field_keeps_its_column_for_the_reward(tmp_path):
    import datasets

    from gradprobe.mix import load_mix

    verl = tmp_path / "verl.parquet"

    datasets.Dataset.from_list(verl_source_rows("openai/gsm8k", "train", 2)).to_parquet(str(verl))
    mix = load_mix(verl, answer_field="extra_info.answer")
    assert [r.answer for r in mix.records] == ["gold0", "gold1"]
    assert mix.records[0].extra["extra_info"] == {"split": "train", "index": 0, "answer": "gold0"}
    assert "reward_model" in mix.records[0].extra  # not read as the answer here: handed on


def test_reward_conventions_told_apart_by_signature(tmp_path, monkeypatch):
    from gradprobe.rewards import resolve_reward

    (tmp_path / "verl_reward_fns.py").write_text(VERL_REWARDS)
    (tmp_path / "trl_reward_fns.py").write_text(TRL_REWARDS)
    (tmp_path / "own_reward_fns.py").write_text(
        "def exact(completion, answer, **context):\n    return float(completion == answer)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Called as the scoring stage calls them: the text the model saw, the task, the chat messages.
    chat = [{"role": "user", "content": "make 5"}]
    context = {"prompt": "user: make 5\nassistant: ", "task": "countdown", "chat_prompt": chat,
               "extra_info": {"index": 0}}
    countdown = resolve_reward("verl_reward_fns:countdown_score")
    assert countdown("5 = 3+2", {"target": 5, "numbers": [3, 2]}, **context) == 1.0
    assert countdown("no", {"target": 5, "numbers": [3, 2]}, **context) == pytest.approx(0.2)
    verl = resolve_reward("verl_reward_fns:compute_score")
    assert verl("say town1", ["city1", "town1"], **{**context, "data_source": "nq"}) == 1.25
    trl = resolve_reward("trl_reward_fns:accuracy_reward")
    assert trl(" ab", None, **{**context, "solution": "ab"}) == pytest.approx(1.2)
    # A gradprobe function gets a structured answer as JSON text.
    assert resolve_reward("own_reward_fns:exact")('{"a": 1}', {"a": 1}, **context) == 1.0
    conventions = {spec: resolve_reward(spec).convention for spec in
                   ("verl_reward_fns:compute_score", "verl_reward_fns:countdown_score",
                    "trl_reward_fns:accuracy_reward", "own_reward_fns:exact", "exact")}
    assert conventions == {"verl_reward_fns:compute_score": "verl", "verl_reward_fns:countdown_score": "verl",
                           "trl_reward_fns:accuracy_reward": "trl", "own_reward_fns:exact": "gradprobe",
                           "exact": "gradprobe"}
