"""The ``math`` reward: is the completion's final answer mathematically equal to the reference?

Parsing and comparison are math_verify's (LaTeX, ``\\boxed{}``, fractions, ``x = 2`` and other
equivalent forms). math_verify bounds its own run time with ``signal.alarm``, which only works
in the main thread of the main interpreter; elsewhere the reward turns those timeouts off and
relies on `_too_big`, a cheap guard against the answers that make sympy run for minutes
(power towers, huge factorials). A worker *process* scores in its own main thread, so it keeps
the timeouts.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from gradprobe.rewards.registry import register_reward

# The most decimal digits a parsed number may have before comparing it is refused as too costly.
MAX_DIGITS = 100_000
# The largest power of a compound symbolic base, like (x+1)^n, that sympy may have to expand.
MAX_SYMBOLIC_EXPONENT = 256
# Only the tail of a longer completion is parsed: the final answer is at the end, and parsing
# cost grows with length when no timeout can stop it.
MAX_CHARS = 50_000
# Math delimiters that say the reference is already written the way math_verify extracts it.
_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")

log = logging.getLogger(__name__)


@register_reward("math")
def math_answer(
    completion: str, answer: Any, timeout: float = 5, max_chars: int = MAX_CHARS, **_: Any
) -> float:
    """1.0 when the completion's final answer equals `answer` by math_verify, else 0.0.

    `timeout` (seconds, per parse and per comparison) applies in the main thread only. Never
    raises on a malformed completion or reference: those score 0.0.
    """
    if answer is None or not isinstance(completion, str):
        return 0.0
    try:
        return float(_verify(completion[-int(max_chars):], str(answer), _timeout(timeout)))
    except Exception:  # noqa: BLE001  (math_verify and sympy raise anything on odd input)
        log.debug("math reward failed on %.200r", completion, exc_info=True)
        return 0.0


def _timeout(seconds: float) -> int | None:
    """math_verify's timeout argument: whole seconds, or None where signals cannot be used."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return max(1, math.ceil(float(seconds)))


def _verify(completion: str, reference: str, timeout: int | None) -> bool:
    from math_verify import parse, verify  # imported late: sympy takes a while to load

    gold = _parse_reference(reference, timeout)
    if not gold:
        return False
    predicted = parse(completion, parsing_timeout=timeout)  # type: ignore[arg-type]
    if not predicted or _too_big(gold) or _too_big(predicted):
        return False
    return bool(verify(gold, predicted, timeout_seconds=timeout))


def _parse_reference(reference: str, timeout: int | None) -> list[Any]:
    """Parse the reference, reading a bare one (``\\sqrt{2}``, ``3x+1``) as LaTeX math.

    Without delimiters math_verify's plain-expression reading is lossy (``2\\sqrt{3}`` -> 2), so
    a bare reference is wrapped in ``$...$`` first and read plainly only if that fails.
    """
    from math_verify import parse

    text = reference.strip()
    if not text:
        return []
    if not any(mark in text for mark in _DELIMITERS):
        wrapped = parse(f"${text}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        if wrapped:
            return wrapped
    return parse(text, parsing_timeout=timeout)  # type: ignore[arg-type]


def _too_big(parsed: list[Any]) -> bool:
    """True when any parsed expression denotes a number too large to compare quickly."""
    from sympy import Basic

    return any(
        isinstance(item, Basic) and _log10_bound(item) > MAX_DIGITS for item in parsed
    )


def _log10_bound(expr: Any) -> float:
    """An upper bound on log10 of the magnitude of any number inside `expr`, without evaluating.

    sympy keeps parsed powers unevaluated, so ``9^{9^{9}}`` costs nothing until compared; this
    walks the tree with log-space arithmetic to see the size coming.
    """
    from sympy import Float, Integer, Pow, Rational, factorial

    if isinstance(expr, Integer):
        return math.log10(abs(int(expr))) if expr else 0.0
    if isinstance(expr, Rational):
        return max(_log10_bound(Integer(expr.p)), _log10_bound(Integer(expr.q)))
    if isinstance(expr, Float):
        value = abs(float(expr))
        return math.log10(max(value, 1 / value)) if value and math.isfinite(value) else 0.0
    args = [_log10_bound(arg) for arg in getattr(expr, "args", ())]
    if isinstance(expr, Pow) and len(args) == 2:
        if _expandable(expr.base) and args[1] > math.log10(MAX_SYMBOLIC_EXPONENT):
            return math.inf  # expanding (x+1)^1000 alone takes sympy seconds
        return _power_bound(args[0], args[1])
    if isinstance(expr, factorial) and args:
        return math.inf if args[0] > 7 else 10 ** args[0] * args[0]
    return sum(args)  # sums and products: the logs of the parts add up to a bound


def _expandable(base: Any) -> bool:
    """True for a compound base with variables in it, like ``x + 1``, whose powers sympy expands."""
    return bool(getattr(base, "free_symbols", None)) and bool(getattr(base, "args", ()))


def _power_bound(base_log: float, exponent_log: float) -> float:
    """log10 bound of ``base ** exponent`` from the bounds of the two."""
    if exponent_log > 15:
        return math.inf
    return base_log * 10**exponent_log
