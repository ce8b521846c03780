"""Bad input, hostile rewards and interruptions: one clear line and exit 2 (or 130), a stated
warning where a result would silently be wrong, and nothing half-written or left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import MIX_ROWS, save_tiny_model, write_jsonl
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
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
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


# ------------------------------------------------------------------ user rewards: errors, hangs

REWARDS = '''
import os, time

def text(completion, answer, **kw):
    return "abc"

def nothing(completion, answer, **kw):
    return None

def broken(completion, answer, **kw):
    raise KeyError("no such column")

def hangs(completion, answer, **kw):
    open(os.environ["GRADPROBE_TEST_MARK"], "a").close()
    time.sleep(60)
    return 1.0

def sandbox_hangs(completion, answer, **kw):
    from gradprobe.rewards.python_tests import run_python_tests
    open(os.environ["GRADPROBE_TEST_MARK"], "a").close()
    return float(run_python_tests("import time\\ntime.sleep(60)", "assert f(1) == 1", timeout=60).passed)

def hangs_stubbornly(completion, answer, **kw):
    try:
        time.sleep(60)
    except Exception:
        return 1.0
    return 1.0
'''


@pytest.fixture()
def user_rewards(tmp_path, monkeypatch) -> str:
    (tmp_path / "hostile_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "hostile_rewards"


@pytest.mark.parametrize("function, workers, fragments", [
    ("text", "2", ("returned 'abc' (str)",)),
    ("nothing", "1", ("returned None (NoneType)",)),
    ("broken", "2", ("raised KeyError", "no such column")),
])
def test_a_bad_user_reward_is_one_line_naming_task_prompt_and_value(
    tiny_llama, tiny_mix, tmp_path, user_rewards, function, workers, fragments
):
    result = scan(tiny_llama, tiny_mix, tmp_path / "o", "--reward", f"echo={user_rewards}:{function}",
                  "--reward-workers", workers)
    assert_user_error(result, "task 'echo', prompt 'echo-", f"{user_rewards}:{function}", *fragments)
    assert not (tmp_path / "o").exists() and nothing_left(tmp_path)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_hanging_user_reward_stops_at_the_reward_timeout(
    tiny_llama, tiny_mix, tmp_path, user_rewards, workers
):
    start = time.monotonic()
    result = scan(tiny_llama, tiny_mix, tmp_path / "o", "--reward", f"echo={user_rewards}:hangs_stubbornly",
                  "--reward-timeout", "0.5", "--reward-workers", workers)
    assert_user_error(result, "task 'echo', prompt 'echo-", "--reward-timeout 0.5s")
    assert time.monotonic() - start < 30


# ------------------------------------------------------------ Ctrl-C, SIGTERM, SIGKILL: no orphans

REPO = Path(__file__).resolve().parents[1]


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (the scan and every child that did not leave it)."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def start_scan(model: Path, mix: Path, place: Path, reward: str) -> subprocess.Popen:
    place.mkdir()
    (place / "hostile_rewards.py").write_text(REWARDS)
    env = {**os.environ, "GRADPROBE_TEST_MARK": str(place / "mark"),
           "PYTHONPATH": os.pathsep.join([str(place), os.environ.get("PYTHONPATH", ""), str(REPO)])}
    command = [sys.executable, "-m", "gradprobe.cli", "scan", str(model), str(mix), "--out",
               str(place / "o"), *FAST, "--reward", f"echo=hostile_rewards:{reward}",
               "--reward-workers", "2"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def wait_for_rewards(proc: subprocess.Popen, place: Path) -> None:
    deadline = time.monotonic() + 120
    while not (place / "mark").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "the reward never ran"
        time.sleep(0.05)


def test_every_way_out_stops_all_children_and_leaves_nothing(tiny_llama, tiny_mix, tmp_path):
    """Ctrl-C, SIGTERM and SIGKILL of a scan whose two reward workers are busy (a sleeping
    reward; a sandbox running a sleeping candidate): exit 130/143 with one line, and no worker,
    sandbox, staging directory or temporary left. The three scans run side by side."""
    from test_sandbox_battery import leftovers, live_sandboxes

    ways = {"ctrl-c": ("hangs", 130, "interrupted"), "sigterm": ("sandbox_hangs", 143, "terminated"),
            "sigkill": ("sandbox_hangs", -9, None)}
    before = leftovers()
    procs = {how: start_scan(tiny_llama, tiny_mix, tmp_path / how, reward)
             for how, (reward, _, _) in ways.items()}
    for how, proc in procs.items():
        wait_for_rewards(proc, tmp_path / how)
    time.sleep(0.5)  # both workers busy
    os.killpg(procs["ctrl-c"].pid, signal.SIGINT)  # what a terminal sends to the foreground group
    procs["sigterm"].send_signal(signal.SIGTERM)
    procs["sigkill"].send_signal(signal.SIGKILL)
    start = time.monotonic()
    for how, proc in procs.items():
        _, err = proc.communicate(timeout=30)
        _, code, line = ways[how]
        assert proc.returncode == code, (how, err.decode()[-3000:])
        if line is not None:
            lines = [l for l in err.decode().splitlines() if l.strip()]
            assert lines[-1] == line and "Traceback" not in err.decode(), (how, err.decode()[-3000:])
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while any(session_members(p.pid) for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for how, proc in procs.items():
        assert session_members(proc.pid) == [], how
        assert not (tmp_path / how / "o").exists() and nothing_left(tmp_path / how), how
    assert live_sandboxes() == [] and leftovers() == before


# ------------------------------------------------------- bad files: one line and exit 2, not a trace

def test_corrupt_or_truncated_weights_are_one_line(tmp_path, tiny_mix):
    model = save_tiny_model(tmp_path / "m")
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    for broken in (whole[: len(whole) // 2], b"not safetensors at all"):
        weights.write_bytes(broken)
        assert_user_error(scan(model, tiny_mix, tmp_path / "o"), "corrupt or truncated safetensors")


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_mix_that_is_not_utf8_is_one_line_in_scan_and_mix_inspect(tmp_path, encoding):
    rows = [{"task": "café", "prompt": f"prix {i} €", "answer": "ü"} for i in range(3)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    mix = tmp_path / "mix.jsonl"
    mix.write_bytes(text.encode(encoding, errors="replace"))
    assert_user_error(run("mix", "inspect", mix), "not UTF-8", "save it as UTF-8")
    assert_user_error(scan(tmp_path / "no-model", mix, tmp_path / "o"), "not UTF-8")


def test_a_prompt_longer_than_the_model_positions_is_an_error_or_truncated_on_request(tmp_path):
    model = save_tiny_model(tmp_path / "m", max_position_embeddings=24)
    rows = [{"task": t, "prompt": ("x" * 30 if i == 1 else "ab"), "answer": "a"}
            for t in ("p", "q") for i in range(2)]
    mix = write_jsonl(tmp_path / "long.jsonl", rows)
    assert_user_error(run("scan", model, mix, "--out", tmp_path / "o", *FAST[:6]),
                      "prompt 'p-1' of task 'p' has", "24 positions", "--truncate-prompts")
    result = run("scan", model, mix, "--out", tmp_path / "o", *FAST[:6], "--truncate-prompts")
    assert result.exit_code == 0, result.output
    rollouts = [json.loads(l) for l in (tmp_path / "o" / "rollouts.jsonl").read_text().splitlines()]
    assert max(len(r["prompt_token_ids"]) for r in rollouts) == 24 - 3


def test_disk_full_while_writing_leaves_nothing(tiny_llama, tiny_mix, tmp_path, monkeypatch):
    import errno

    from gradprobe import artifacts

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", full)
    assert_user_error(scan(tiny_llama, tiny_mix, tmp_path / "o"), "No space left on device")
    assert not (tmp_path / "o").exists() and nothing_left(tmp_path)


def offline_rows(**change) -> list[dict]:
    rows = [{"task": t, "prompt_id": f"{t}{p}", "prompt": "ab", "completion": "cd", "reward": float(s)}
            for t in ("a", "b") for p in range(2) for s in range(2)]
    rows[3].update(change)
    return rows


@pytest.mark.parametrize("change, fragments", [
    ({"reward": float("nan")}, ("row 4 has reward nan",)),
    ({"reward": "good"}, ("row 4 has reward 'good'",)),
    ({"prompt_token_ids": [1, 2], "completion_token_ids": [3, 100_000]}, ("row 4 has token id 100000",)),
])
def test_offline_rollouts_are_checked_before_any_gradient_work(tiny_llama, tmp_path, change, fragments):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in offline_rows(**change)))
    assert_user_error(run("scan", tiny_llama, "--rollouts", path, "--out", tmp_path / "o"), *fragments)


def test_report_of_a_scan_without_tasks_is_one_line(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "scan.json").write_text(json.dumps({"schema_version": "1.0", "config": {}}))
    assert_user_error(run("report", tmp_path / "s"), "incomplete scan file", "tasks")


def test_tex_characters_in_task_names_do_not_break_the_plots(tiny_llama, tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{**r, "task": {"add": "$x^$", "echo": "a_b$"}.get(r["task"], r["task"])} for r in MIX_ROWS
            if r["task"] != "chat"]
    mix = write_jsonl(tmp_path / "tex.jsonl", rows)
    result = run("scan", tiny_llama, mix, "--out", tmp_path / "o", *FAST[:7])
    assert result.exit_code == 0, result.output
    result = run("report", tmp_path / "o", "--plots", tmp_path / "pictures")
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "pictures").glob("*.png"))


# --------------------------------------------------- silent wrong results: an error or a warning

def test_a_duplicate_prompt_id_within_a_task_is_an_error(tmp_path):
    rows = [{"task": "t", "prompt_id": "same" if i < 2 else f"p{i}", "prompt": f"q{i}", "answer": "a"}
            for i in range(4)]
    mix = write_jsonl(tmp_path / "dup.jsonl", rows)
    assert_user_error(scan(tmp_path / "no-model", mix, tmp_path / "o"), "prompt_id 'same' twice")


def test_chat_prompts_without_a_chat_template_are_a_stated_warning(tiny_mix, tmp_path):
    model = save_tiny_model(tmp_path / "m")
    for file in model.glob("chat_template*"):
        file.unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = scan(model, tiny_mix, tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "warning: the tokenizer has no chat template" in result.output
    document = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert any("no chat template" in w for w in document["warnings"])


def test_reward_with_rollouts_is_an_error_not_ignored(tiny_llama, tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in offline_rows()))
    assert_user_error(run("scan", tiny_llama, "--rollouts", path, "--out", tmp_path / "o",
                          "--reward", "nosuch=exact"), "--reward does not apply with --rollouts")


def test_a_mix_without_a_task_column_is_a_stated_warning(tmp_path):
    mix = write_jsonl(tmp_path / "single.jsonl", [{"prompt": f"q{i}", "answer": "a"} for i in range(3)])
    result = run("mix", "inspect", mix)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "no 'task' column" in result.output and "'single'" in result.output
