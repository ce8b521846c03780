"""The ``format`` reward: does the completion present its answer in the expected form?

The usual companion of a correctness reward in GRPO recipes (``reward = ["math", "format"]``,
``weights = [1.0, 0.2]``): it pays for the shape of the answer, not its value. ``format`` alone
accepts any of the styles below; ``format:STYLE`` (or the option ``style``) asks for one.
"""

from __future__ import annotations

import re
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.registry import register_reward

STYLES: dict[str, re.Pattern[str]] = {
    # A LaTeX \boxed{...} with something inside, as math prompts ask for.
    "boxed": re.compile(r"\\boxed\{\s*[^\s}]"),
    # <answer>...</answer> tags with something inside.
    "answer_tag": re.compile(r"<answer>\s*\S.*?</answer>", re.DOTALL),
    # The R1-style layout: the whole completion is <think>...</think> then <answer>...</answer>.
    "think_answer": re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL),
    # A fenced code block (```python ... ```), as code tasks ask for.
    "code_block": re.compile(r"```[\w+-]*\n.*?```", re.DOTALL),
}


@register_reward("format", argument="style", required=False)
def answer_format(completion: str, answer: Any, style: str = "any", **_: Any) -> float:
    """1.0 when the completion matches the format `style` (any style when ``any``), else 0.0."""
    if not isinstance(completion, str):
        return 0.0
    if style == "any":
        return float(any(_matches(name, completion) for name in STYLES))
    if style not in STYLES:
        raise UserInputError(
            f"format reward: unknown style {style!r}; choose any, {', '.join(STYLES)}"
        )
    return float(_matches(style, completion))


def _matches(style: str, completion: str) -> bool:
    pattern = STYLES[style]
    if style == "think_answer":
        return pattern.fullmatch(completion) is not None
    return pattern.search(completion) is not None
