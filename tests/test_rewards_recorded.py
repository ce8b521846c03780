"""Each task's effective reward, after the mix spec and the --reward options, is recorded in
scan.json, shown on the console and previewed by `mix inspect --reward`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gradprobe import schema
from gradprobe.cli import app
from gradprobe.demo import DEMO_MIX_PATH, DEMO_REWARDS
from gradprobe.rewards import build_composite, effective_rewards, parse_reward_options

runner = CliRunner()
TASKS = ["math", "code", "chat"]


def test_effective_rewards_follow_overrides_spec_and_default():
    configured = {"math": build_composite(["numeric", "format"], [1.0, 0.2], {}),
                  "code": build_composite(["exact"], None, {})}
    options = ["code=regex:^def", "numeric"]
    chosen = parse_reward_options(options, TASKS, "exact", configured)
    assert effective_rewards(options, chosen, configured) == {
        "math": {"spec": "numeric+0.2*format", "source": "mix spec"},
        "code": {"spec": "regex:^def", "source": "--reward code=..."},
        "chat": {"spec": "numeric", "source": "--reward default"},
    }
    plain = parse_reward_options([], TASKS, "exact", {})
    assert effective_rewards([], plain, {})["chat"] == {"spec": "exact", "source": "built-in default"}


def test_demo_scan_records_and_shows_its_rewards(demo_scan, demo_scan_dir):
    document = json.loads((demo_scan_dir / "scan.json").read_text())
    schema.validate(document, "scan")
    assert {t: r["spec"] for t, r in document["rewards"].items()} == DEMO_REWARDS
    assert all(r["source"] == f"--reward {t}=..." for t, r in document["rewards"].items())
    table = demo_scan.output.split("Rollouts and rewards per task")[1].split("Per-task gradients")[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines()
            if line.split() and line.split()[0] in DEMO_REWARDS}
    for task, reward in DEMO_REWARDS.items():
        assert rows[task][1] == reward  # the rollouts table: task, reward, prompts, mean reward...
        mixed = f"{1 - document['tasks'][task]['degenerate_fraction']:.0%}"
        assert mixed in rows[task]


def test_mix_inspect_previews_a_spec_overridden_on_the_command_line(tmp_path):
    (tmp_path / "mix.toml").write_text(
        f'[tasks.add]\ndata = "{DEMO_MIX_PATH}"\nreward = ["numeric", "format"]\nweights = [1, 0.5]\n'
        f'[tasks.count]\ndata = "{DEMO_MIX_PATH}"\nreward = "numeric"\n')
    result = runner.invoke(app, ["mix", "inspect", str(tmp_path / "mix.toml"), "--reward", "count=exact"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rows = {task: next(line for line in lines if line.split()[1:2] == [task]) for task in ("add", "count")}
    assert "numeric+0.5*format (mix" in rows["add"]  # the cell wraps at 80 columns
    assert "exact (--reward" in rows["count"]
