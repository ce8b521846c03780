"""The ``countdown`` reward: does the completion's equation reach the target with the given numbers?

The task data, in the order looked up:

* context keys ``numbers`` (a list of ints, or a string such as ``"3 5 7"`` or ``"[3, 5, 7]"``)
  and ``target`` (an int or a string of one), i.e. mix columns of those names;
* else the ``answer``: a mapping or JSON object ``{"numbers": [3, 5, 7], "target": 22}``, or
  text naming both, such as ``"target=22; numbers=3 5 7"`` (``:`` works for ``=``, and the
  separators are free).

The equation is the last ``<answer>...</answer>`` block of the completion, else its last line that
reads as arithmetic; ``expr = value`` is accepted and only ``expr`` is scored. The expression is
parsed with `ast` and only integer literals, ``+ - * /``, parentheses and unary minus/plus pass;
every literal must be one of the given numbers, each used at most once (``use_all=True``: exactly
once), and the exact value (`fractions.Fraction`) must equal the target.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.registry import register_reward

# Longer "equations" are not countdown answers; the cap also bounds parsing time and nesting.
MAX_EXPRESSION_CHARS = 256
# Literals above this are not countdown numbers (they would only make the arithmetic costly).
MAX_LITERAL = 10**9

_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</answer>", re.IGNORECASE)
_ARITHMETIC = re.compile(r"[\d\s+\-*/().=]+")
# Look-alike operators that models write; mapped to the ASCII the parser accepts.
_OPERATORS = str.maketrans({"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-"})
_LATEX = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\\left": "", "\\right": "",
          "\\(": "", "\\)": "", "\\[": "", "\\]": ""}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


@register_reward("countdown")
def countdown(
    completion: str,
    answer: Any,
    numbers: Any = None,
    target: Any = None,
    use_all: bool = False,
    **_: Any,
) -> float:
    """1.0 when the completion's equation uses the given numbers (each at most once) to make the
    target exactly, else 0.0; raises `UserInputError` only if the task data lacks numbers or target.
    """
    given, goal = task_numbers(answer, numbers, target)
    expression = extract_equation(completion) if isinstance(completion, str) else None
    if expression is None:
        return 0.0
    parsed = safe_parse(expression)
    if parsed is None:
        return 0.0
    value, used = parsed
    if not _uses_allowed(used, given, bool(use_all)):
        return 0.0
    return float(value == goal)


def task_numbers(
    answer: Any, numbers: Any = None, target: Any = None
) -> tuple[list[int], Fraction]:
    """The task's numbers and target, from the context values or else from the answer."""
    if numbers is None or target is None:
        from_answer = _from_answer(answer)
        numbers = from_answer.get("numbers") if numbers is None else numbers
        target = from_answer.get("target") if target is None else target
    try:
        given, goal = _as_numbers(numbers), Fraction(str(target).strip())
    except (TypeError, ValueError, ZeroDivisionError):
        given, goal = None, None
    if not given or goal is None:
        raise UserInputError(
            "countdown reward needs the numbers and the target: give mix columns 'numbers' and "
            "'target', or an answer like {\"numbers\": [3, 5, 7], \"target\": 22} or "
            f"'target=22; numbers=3 5 7'; got answer={str(answer)[:80]!r}, numbers={numbers!r}, "
            f"target={target!r}"
        )
    return given, goal


def _from_answer(answer: Any) -> Mapping[str, Any]:
    if isinstance(answer, Mapping):
        return answer
    text = str(answer or "")
    try:
        loaded = json.loads(text)
        if isinstance(loaded, Mapping):
            return loaded
    except ValueError:
        pass
    found: dict[str, Any] = {}
    goal = re.search(r"target\s*[=:]\s*(-?\d+)", text, re.IGNORECASE)
    if goal:
        found["target"] = goal.group(1)
    listed = re.search(r"numbers\s*[=:]\s*\[?([-\d,\s]+)", text, re.IGNORECASE)
    if listed:
        found["numbers"] = listed.group(1)
    return found


def _as_numbers(value: Any) -> list[int]:
    if isinstance(value, str):
        return [int(item) for item in re.findall(r"-?\d+", value)]
    return [int(item) for item in value]


def extract_equation(completion: str) -> str | None:
    """The equation text: the last ``<answer>`` block, else the last arithmetic-looking line."""
    block = _last_answer_block(completion)
    if block is not None:
        return _expression_side(block)
    for line in reversed(completion.splitlines()):
        candidate = _expression_side(line)
        if candidate is not None and _looks_like_arithmetic(candidate):
            return candidate
    return None


def _last_answer_block(text: str) -> str | None:
    """Text of the last ``<answer>...</answer>``; two linear scans, where a lazy regex is
    quadratic on a completion full of unclosed tags."""
    closes = [match.start() for match in _CLOSE_TAG.finditer(text)]
    if not closes:
        return None
    opens = [match.end() for match in _OPEN_TAG.finditer(text, 0, closes[-1])]
    return text[opens[-1]:closes[-1]] if opens else None


def _expression_side(text: str) -> str | None:
    """The expression in ``expr`` or ``expr = value`` (or ``value = expr``), cleaned up."""
    text = text.translate(_OPERATORS)
    for latex, plain in _LATEX.items():
        text = text.replace(latex, plain)
    text = text.strip().strip("$`*").strip()
    text = text.rsplit(":", 1)[-1].strip().rstrip(".")  # "Equation: 1 + 2" -> "1 + 2"
    sides = [side.strip() for side in text.split("=")]
    if len(sides) > 2 or not sides[0]:
        return None
    if len(sides) == 2 and sides[0].isdigit() and not sides[1].isdigit():
        return sides[1]  # written as "value = expr"
    return sides[0]


def _looks_like_arithmetic(text: str) -> bool:
    return (
        _ARITHMETIC.fullmatch(text) is not None
        and any(ch.isdigit() for ch in text)
        and any(op in text for op in "+-*/")
    )


def safe_parse(expression: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and literals of an arithmetic expression, or None if it is not plain arithmetic.

    Characters are whitelisted before `ast` sees the text, so names, calls, attributes and strings
    never reach the parser; ``**`` is refused by the tree walk, and the length cap bounds nesting.
    """
    if len(expression) > MAX_EXPRESSION_CHARS or not _ARITHMETIC.fullmatch(expression):
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        used: list[int] = []
        return _evaluate(tree.body, used), used
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError, TypeError):
        return None


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Evaluate a whitelisted node exactly, recording the integer literals met."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if abs(node.value) > MAX_LITERAL:
            raise ValueError("literal too large")
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, used))
    raise ValueError(f"not allowed in a countdown equation: {type(node).__name__}")


def _uses_allowed(used: list[int], given: list[int], use_all: bool) -> bool:
    """Each literal is one of the given numbers, none used more often than it was given."""
    used_count, given_count = Counter(used), Counter(given)
    if use_all:
        return used_count == given_count
    return all(used_count[n] <= given_count[n] for n in used_count)
