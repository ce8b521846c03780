"""Synthetic verifiable tasks for the demo model and mix.

Each task turns a `random.Random` into ``(prompt, answer)`` pairs. Prompts are plain strings that
end with a cue (``=``) after which the model writes the answer and then EOS. Every task names the
reward that scores it: ``exact`` (normalised string match) or ``numeric`` (the last number in the
completion equals the answer). Only the standard library is used, so importing this is cheap.

Tasks, chosen to be of different nature:

- ``add``: multi-digit addition, ``add 47+385=`` -> ``432`` (numeric)
- ``solve``: find the missing addend, ``solve 17+x=42 x=`` -> ``25`` (numeric; a subtraction
  in disguise, the arithmetic-reasoning stand-in for Countdown, which a model this small cannot do)
- ``reverse``: reverse a string of letters, ``reverse abcde=`` -> ``edcba`` (exact)
- ``count``: count a letter, ``count a in abacad=`` -> ``3`` (numeric)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Example = tuple[str, str]

MAX_PROMPT_CHARS = 24
MAX_ANSWER_CHARS = 8


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to make examples and which reward scores its completions."""

    name: str
    make_examples: Callable[[random.Random, int], list[Example]]
    reward: str  # "exact" or "numeric"
    description: str = ""


def _number(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def make_add(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append((f"add {a}+{b}=", str(a + b)))
    return out


def make_solve(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        a, x = rng.randint(0, 99), rng.randint(0, 99)
        out.append((f"solve {a}+x={a + x} x=", str(x)))
    return out


_REVERSE_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_reverse(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        length = rng.randint(3, 6)
        text = "".join(rng.choice(_REVERSE_LETTERS) for _ in range(length))
        out.append((f"reverse {text}=", text[::-1]))
    return out


_COUNT_LETTERS = "abc"


def make_count(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        length = rng.randint(4, 9)
        text = "".join(rng.choice(_COUNT_LETTERS) for _ in range(length))
        letter = rng.choice(_COUNT_LETTERS)
        out.append((f"count {letter} in {text}=", str(text.count(letter))))
    return out


TASKS: dict[str, TaskSpec] = {
    "add": TaskSpec("add", make_add, "numeric", "multi-digit addition"),
    "solve": TaskSpec("solve", make_solve, "numeric", "missing addend (subtraction)"),
    "reverse": TaskSpec("reverse", make_reverse, "exact", "string reversal"),
    "count": TaskSpec("count", make_count, "numeric", "count a letter's occurrences"),
}
