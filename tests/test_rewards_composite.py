"""Composite rewards, the format reward, and reward worker processes against serial scoring."""

from __future__ import annotations

import os

import pytest

from gradprobe.errors import UserInputError
from gradprobe.rewards import RewardSpec, build_composite, parse_composite, parse_reward_options, resolve_reward
from gradprobe.rewards.composite import split_terms
from gradprobe.rollouts import Rollout
from gradprobe.scoring import score_rollouts


@pytest.mark.parametrize("text, terms", [
    ("math", [(1.0, "math")]),
    ("math+0.2*format", [(1.0, "math"), (0.2, "format")]),
    ("0.5*exact + 2*numeric", [(0.5, "exact"), (2.0, "numeric")]),
    ("exact+-1e-1*format:boxed", [(1.0, "exact"), (-0.1, "format:boxed")]),
    ("numeric+0.3*regex:^a+b*$", [(1.0, "numeric"), (0.3, "regex:^a+b*$")]),  # a value runs to the end
    ("my_rewards:longish+format", [(1.0, "my_rewards:longish"), (1.0, "format")]),
])
def test_split_terms(text, terms):
    assert split_terms(text) == terms


def test_composite_scores_total_and_components():
    reward = parse_composite("math+0.2*format")
    total, parts = reward.score("so \\boxed{4}", "4", task="t", prompt="2+2?")
    assert parts == {"math": 1.0, "format": 1.0} and total == pytest.approx(1.2)
    total, parts = reward.score("it is 5", "4", task="t", prompt="2+2?")
    assert parts == {"math": 0.0, "format": 0.0} and total == 0.0
    assert reward.name == "math+0.2*format"


def test_composite_options_and_errors():
    reward = build_composite(["format", "exact"], [1.0, 1.0], {"format": {"style": "answer_tag"}})
    assert reward.score("<answer>x</answer>", "y")[1] == {"format": 1.0, "exact": 0.0}
    assert reward.score("\\boxed{x}", "y")[1]["format"] == 0.0
    with pytest.raises(UserInputError, match="one weight per reward"):
        build_composite(["exact", "format"], [1.0])
    with pytest.raises(UserInputError, match="appears twice"):
        parse_composite("exact+0.5*exact")
    with pytest.raises(UserInputError, match="unknown reward 'nope'"):
        parse_composite("exact+nope")
    with pytest.raises(UserInputError, match="empty term"):
        parse_composite("exact++format")
    nan = build_composite(["exact"], options={})
    nan = type(nan)((("bad", 1.0, RewardSpec("bad", lambda c, a, **k: float("nan"))),))
    with pytest.raises(UserInputError, match="'bad' returned nan; rewards must be finite"):
        nan.score("c", "a", task="x")


@pytest.mark.parametrize("completion, style, expected", [
    ("the answer is \\boxed{\\frac{1}{2}}", "boxed", 1.0),
    ("the answer is \\boxed{}", "boxed", 0.0),
    ("<answer> 7 </answer>", "answer_tag", 1.0),
    ("<think>hm</think>\n<answer>7</answer>", "think_answer", 1.0),
    ("preamble <think>hm</think><answer>7</answer>", "think_answer", 0.0),
    ("```python\nprint(1)\n```", "code_block", 1.0),
    ("```python\nprint(1)\n```", "any", 1.0),
    ("just 7", "any", 0.0),
])
def test_format_reward(completion, style, expected):
    spec = "format" if style == "any" else f"format:{style}"
    assert resolve_reward(spec)(completion, None) == expected
    with pytest.raises(UserInputError, match="unknown style"):
        resolve_reward("format:xml")("x", None)


def test_spec_rewards_apply_unless_the_command_line_names_the_task():
    configured = {"a": parse_composite("math+0.2*format"), "b": parse_composite("numeric")}
    chosen = parse_reward_options(["b=exact", "regex:x"], ["a", "b", "c"], "exact", configured)
    assert chosen["a"].name == "math+0.2*format"
    assert chosen["b"].name == "exact"
    assert chosen["c"].name == "regex:x"


def rollouts(n: int) -> list[Rollout]:
    texts = ["\\boxed{4}", "<answer>4</answer>", "4", "five", "(3+5)*2 = 16", "\\boxed{2/4}"]
    answers = ["4", "4", "4", "5", '{"numbers": [3, 5, 2], "target": 16}', "1/2"]
    out = []
    for i in range(n):
        j = i % len(texts)
        task = "count" if j == 4 else "math"
        out.append(Rollout(task, f"p{i // 3}", i % 3, "q", texts[j], [1], [2], answer=answers[j],
                           extra={"row": i}))
    return out


def test_reward_workers_equal_serial(tmp_path, monkeypatch):
    (tmp_path / "pid_reward.py").write_text(
        "import os\n"
        "def pid(completion, answer, row, **kw):\n"
        "    return float(os.getpid() % 100000 + 0 * row)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = {"math": parse_composite("math+0.2*format"), "count": parse_composite("countdown+format")}
    items = rollouts(36)
    seen: list[int] = []
    serial = score_rollouts(items, rewards, seen.append)
    parallel = score_rollouts(items, rewards, seen.append, workers=2)
    assert [(r.reward, r.reward_components) for r in parallel] == [(r.reward, r.reward_components) for r in serial]
    assert sum(seen) == 72  # the progress callback saw every item in both runs
    assert {r.reward for r in serial if r.task == "math"} >= {1.2, 1.0, 0.2}
    # The workers really are other processes.
    pids = score_rollouts(items[:8], {"math": parse_composite("pid_reward:pid"),
                                      "count": parse_composite("pid_reward:pid")}, workers=2)
    assert os.getpid() % 100000 not in {r.reward for r in pids}


def test_reward_workers_need_importable_functions():
    local = {"math": build_composite(["exact"])}
    local["math"] = type(local["math"])((("local", 1.0, RewardSpec("local", lambda c, a, **k: 1.0)),))
    with pytest.raises(UserInputError, match="--reward-workers 2.*importable"):
        score_rollouts(rollouts(4), {"math": local["math"], "count": local["math"]}, workers=2)
    with pytest.raises(UserInputError, match="at least 1"):
        score_rollouts(rollouts(4), {"math": local["math"], "count": local["math"]}, workers=0)
