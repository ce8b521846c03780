"""Rewards that compare strings: exact match, the last number, a regular expression."""

from __future__ import annotations

import math
import re
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.registry import register_reward

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def normalise(text: str) -> str:
    """Lower-case, trim, collapse white space, drop a trailing period."""
    return " ".join(text.strip().lower().split()).rstrip(".")


@register_reward("exact")
def exact(completion: str, answer: str | None, **_: Any) -> float:
    """1.0 when the normalised completion equals the normalised answer."""
    if answer is None:
        return 0.0
    return float(normalise(completion) == normalise(str(answer)))


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@register_reward("numeric")
def numeric(
    completion: str, answer: str | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9, **_: Any
) -> float:
    """1.0 when the last number in the completion equals the answer within tolerance."""
    got = last_number(completion)
    want = last_number(str(answer)) if answer is not None else None
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=float(rel_tol), abs_tol=float(abs_tol)))


@register_reward("regex", argument="pattern")
def regex(completion: str, answer: str | None, pattern: str = "", **_: Any) -> float:
    """1.0 when `pattern` matches the completion; ``{answer}`` in it stands for the escaped answer."""
    if "{answer}" in pattern:
        pattern = pattern.replace("{answer}", re.escape(str(answer or "")))
    try:
        return float(re.search(pattern, completion) is not None)
    except re.error as exc:
        raise UserInputError(f"bad regex reward pattern {pattern!r}: {exc}") from None
