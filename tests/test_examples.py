"""Every example command in `--help` and in README.md runs.

The commands run in a scratch directory that holds what the examples name: the demo scan (as
`gradprobe-scan-demo` and as the `scans/step...` directories), the demo mix (`mix.jsonl`, and a
`mix.toml` spec over it) and a synthetic training log. Only commands that need the user's own
checkpoint (`./my-checkpoint`, `./checkpoints/...`) or a GPU are skipped.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import DEMO_COMMAND
from gradprobe.cli import app
from gradprobe.demo import DEMO_MIX_PATH, TASKS

ROOT = Path(__file__).resolve().parents[1]
HELP_COMMANDS = [["scan"], ["report"], ["compare"], ["gains"], ["mix", "inspect"]]
USER_CHECKPOINT = re.compile(r"\./(my-checkpoint|checkpoints/)")
runner = CliRunner()


def help_text(command: list[str]) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def help_examples() -> list[str]:
    """Lines of the help texts that are gradprobe commands."""
    lines = [line.strip(" │") for command in HELP_COMMANDS for line in help_text(command).splitlines()]
    return [line.strip() for line in lines if line.strip().startswith("gradprobe ")]


def readme_examples() -> list[str]:
    """gradprobe commands of README.md's bash blocks (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] == "gradprobe":
                    commands.append(shlex.join(words))
    return commands


def fail_on_examples() -> list[tuple[str, str]]:
    """The `--fail-on` expressions that report's and compare's help give as examples."""
    found = []
    for command in ("report", "compare"):
        text = " ".join(help_text([command]).split())
        for listed in re.findall(r"holds, e\.g\. (.*?) \(repeatable", text):
            found += [(command, expression.strip(" │")) for expression in listed.split(", ")]
    return found


def write_training_log(folder: Path) -> None:
    """60 steps of every demo task, rewards rising at a task-specific rate."""
    rows = [{"step": step, "task": task, "reward": min(1.0, 0.2 + rate * step / 60)}
            for step in range(60) for rate, task in enumerate(TASKS, start=1)]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train_log.csv").write_text(
        "step,task,reward\n" + "".join(f"{r['step']},{r['task']},{r['reward']}\n" for r in rows))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_scan_dir) -> Path:
    folder = tmp_path_factory.mktemp("examples")
    shutil.copytree(demo_scan_dir, folder / "gradprobe-scan-demo")
    (folder / "scans").mkdir()
    for name in ("step0", "step-0", "step400", "step-400"):
        (folder / "scans" / name).symlink_to(demo_scan_dir, target_is_directory=True)
    shutil.copy(DEMO_MIX_PATH, folder / "mix.jsonl")
    (folder / "mix.toml").write_text("".join(
        f'[tasks.{task}]\ndata = "mix.jsonl"\n' for task in TASKS))  # every task reads its rows
    write_training_log(folder)
    (folder / "run").mkdir()  # a training run's probes (gradprobe.integrations.trl)
    (folder / "run" / "gradprobe.jsonl").write_text("".join(
        json.dumps({"step": step, "tasks": {task: {"share": (i + 1) / 10} for i, task in enumerate(TASKS)}}) + "\n"
        for step in (50, 100)))
    write_config_folders(folder)
    write_verl_data_folder(folder / "data")
    return folder


def write_config_folders(folder: Path) -> None:
    """Folders holding only a config.json, as `gradprobe plan`'s examples name them."""
    from transformers import LlamaConfig, Qwen2Config

    # Llama-3-70B's public dimensions
    LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                tie_word_embeddings=False).save_pretrained(folder / "llama-3-70b-config")
    Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True).save_pretrained(folder / "qwen2-0.5b")
    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False).save_pretrained(
        folder / "qwen2-7b-config")


def write_verl_data_folder(folder: Path) -> None:
    """verl's layout: a folder per data source with a Parquet file per split (demo prompts)."""
    import datasets

    rows = [json.loads(line) for line in Path(DEMO_MIX_PATH).read_text().splitlines()]
    for source in ("add", "count"):
        mine = [r for r in rows if r["task"] == source][:8]
        for split, part in (("train", mine[:6]), ("test", mine[6:])):
            (folder / source).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list([
                {"data_source": source, "prompt": [{"role": "user", "content": r["prompt"]}],
                 "reward_model": {"style": "rule", "ground_truth": r["answer"]}} for r in part
            ]).to_parquet(str(folder / source / f"{split}.parquet"))


def run_example(command: str, folder: Path, monkeypatch) -> None:
    words = shlex.split(command)[1:]
    target = None
    if ">" in words:
        at = words.index(">")
        words, target = words[:at], words[at + 1]
    monkeypatch.chdir(folder)
    result = runner.invoke(app, words)
    allowed = (0, 1) if "--fail-on" in words else (0,)
    assert result.exit_code in allowed, f"{command}\n{result.output}"
    if target is not None:
        (folder / target).write_text(result.stdout)


def _skip_reason(command: str) -> str | None:
    if USER_CHECKPOINT.search(command):
        return "needs the user's own checkpoint"
    if "cuda" in command and not torch.cuda.is_available():
        return "needs a GPU"
    return None


def test_help_and_readme_have_runnable_examples():
    commands = help_examples() + readme_examples()
    runnable = [c for c in commands if _skip_reason(c) is None]
    assert len(help_examples()) >= 10 and len(readme_examples()) >= 8
    assert len(runnable) >= 0.6 * len(commands), "most examples should run on the demo"


@pytest.mark.parametrize("command", sorted(set(help_examples() + readme_examples())))
def test_example_runs(command, workspace, monkeypatch):
    reason = _skip_reason(command)
    if reason:
        pytest.skip(reason)
    if command == DEMO_COMMAND:  # the demo_scan fixture ran it (once per session)
        assert (workspace / "gradprobe-scan-demo" / "scan.json").is_file()
        return
    run_example(command, workspace, monkeypatch)


@pytest.mark.parametrize("command, expression", fail_on_examples())
def test_fail_on_examples_of_the_help_are_valid(command, expression, workspace, monkeypatch):
    scans = ["scans/step0"] + (["scans/step400"] if command == "compare" else [])
    run_example(shlex.join(["gradprobe", command, *scans, "--fail-on", expression]), workspace,
                monkeypatch)


def test_help_shows_defaults_and_no_bool_type():
    text = help_text(["scan"])
    for default in ("[default: 8]", "[default: 256]", "[default: gradprobe-scan;",
                    "[default: the smallest task's size]"):
        assert default in text, default
    assert "<bool>" not in text
    assert not re.search(r"\S \.(\s|$)", text), "a stray space before a full stop"
    assert "<bool>" not in help_text(["report"])


def test_readme_walkthrough_matches_what_the_demo_prints(demo_scan):
    """The README's excerpts of `gradprobe scan --demo` (```text blocks under "Reading the demo's
    output") appear, line for line and in order, in what the demo prints."""
    text = (ROOT / "README.md").read_text()
    walkthrough = text[text.index("### Reading the demo's output"):]
    walkthrough = walkthrough[:walkthrough.index("\n## ")]
    blocks = re.findall(r"```text\n(.*?)```", walkthrough, flags=re.S)
    assert blocks, "no excerpt of the demo's output in the README"
    printed = [line.rstrip() for line in demo_scan.output.splitlines()]
    for block in blocks:
        lines = [line.rstrip() for line in block.rstrip("\n").splitlines()]
        starts = [i for i, line in enumerate(printed) if line == lines[0]]
        assert any(printed[i:i + len(lines)] == lines for i in starts), (
            "README excerpt differs from `gradprobe scan --demo`; copy it again from the demo:\n"
            + "\n".join(lines))
