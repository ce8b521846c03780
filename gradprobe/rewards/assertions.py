"""Deciding a test verdict outside the process that runs the code under test.

Test source (the task's asserts) is split, on gradprobe's side, into a `TestPlan`:

* `steps` go into the sandbox in source order: plain statements (``x = Stack()``) to execute,
  and *probes*, the sub-expressions of each assert that need the candidate's code (``add(2, 3)``);
* `checks` stay outside: each assert's expression with its probes replaced by placeholders.

The sandbox sends back only the probes' values, as tagged JSON (`decode_value`); gradprobe then
evaluates every comparison, ``not``, ``and``/``or``, arithmetic and call of a known pure
function (``len``, ``sorted``, ``math.isclose``, ...) itself (`evaluate`). Expected values such as
the ``5`` of ``assert add(2, 3) == 5`` never enter the sandbox, and an object with a forged
``__eq__`` cannot leave it, so code under test passes only by computing the right values.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gradprobe.errors import UserInputError

# Pure functions gradprobe evaluates itself, by the name tests call them with.
TRUSTED_CALLS: dict[str, Callable[..., Any]] = {
    "abs": abs, "len": len, "sorted": sorted, "min": min, "max": max, "sum": sum,
    "round": round, "all": all, "any": any, "set": set, "frozenset": frozenset, "list": list,
    "tuple": tuple, "dict": dict, "str": str, "int": int, "float": float, "bool": bool,
    "isinstance": isinstance, "type": type, "reversed": lambda x: list(reversed(x)),
    "math.isclose": math.isclose, "math.sqrt": math.sqrt, "math.floor": math.floor,
    "math.ceil": math.ceil, "math.fabs": math.fabs, "math.isnan": math.isnan,
    "math.isinf": math.isinf,
}
TRUSTED_NAMES: dict[str, Any] = {
    "int": int, "float": float, "str": str, "bool": bool, "list": list, "tuple": tuple,
    "dict": dict, "set": set, "frozenset": frozenset, "bytes": bytes, "type(None)": type(None),
    "math.pi": math.pi, "math.e": math.e, "math.inf": math.inf, "math.nan": math.nan,
}
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos,
    ast.Invert: operator.invert,
}
# Values the sandbox sends are at most this big; arithmetic on them stays cheap (no 2**10**9).
MAX_INT_BITS = 4096
MAX_SEQUENCE = 1_000_000
_PROBE = "#probe"


@dataclass(frozen=True)
class Step:
    """One thing the sandbox does, in order: ``exec`` a statement or ``eval`` a probe."""

    kind: str
    source: str


@dataclass(frozen=True)
class Check:
    """One assert, decided outside: `expression` with probes as ``#probeN`` names."""

    source: str
    expression: ast.expr


@dataclass(frozen=True)
class TestPlan:
    steps: tuple[Step, ...]
    checks: tuple[Check, ...]


def plan_tests(source: str) -> TestPlan:
    """Split test source into sandbox steps and outside checks (module docstring).

    Asserts must be top-level statements: one inside a ``def``, loop or ``with`` would run, and
    be decided, inside the sandbox. Raises `UserInputError` for such tests and for bad syntax.
    """
    try:
        module = ast.parse(source)
    except SyntaxError as exc:
        raise UserInputError(f"python_tests: the task's tests are not valid Python ({exc})") from None
    steps: list[Step] = []
    checks: list[Check] = []
    for statement in module.body:
        if isinstance(statement, ast.Assert):
            expression = _split(statement.test, steps)
            checks.append(Check(ast.unparse(statement.test), expression))
            continue
        if any(isinstance(node, ast.Assert) for node in ast.walk(statement)):
            raise UserInputError(
                "python_tests: asserts must be top-level statements of the tests (one inside "
                f"a def, loop or with block would be decided by the code under test): "
                f"{ast.unparse(statement).splitlines()[0][:80]!r}"
            )
        steps.append(Step("exec", ast.unparse(statement)))
    return TestPlan(tuple(steps), tuple(checks))


def _split(node: ast.expr, steps: list[Step]) -> ast.expr:
    """`node` with each sub-expression that needs the candidate replaced by a probe name."""
    if isinstance(node, ast.Constant) or _dotted(node) in TRUSTED_NAMES:
        return node
    children = _trusted_children(node)
    if children is None:
        steps.append(Step("eval", ast.unparse(node)))
        return ast.Name(id=f"{_PROBE}{len(steps) - 1}", ctx=ast.Load())
    rebuilt = type(node)(**{name: getattr(node, name) for name in node._fields})
    for name in children:
        value = getattr(node, name)
        if isinstance(value, list):
            setattr(rebuilt, name, [_split(item, steps) if isinstance(item, ast.expr) else
                                    _split_keyword(item, steps) for item in value])
        elif isinstance(value, ast.expr):
            setattr(rebuilt, name, _split(value, steps))
    return rebuilt


def _split_keyword(keyword: ast.keyword, steps: list[Step]) -> ast.keyword:
    return ast.keyword(arg=keyword.arg, value=_split(keyword.value, steps))


def _trusted_children(node: ast.expr) -> tuple[str, ...] | None:
    """The fields to split further when gradprobe can evaluate `node` itself, else None."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return None if any(isinstance(e, ast.Starred) for e in node.elts) else ("elts",)
    if isinstance(node, ast.Dict):
        return None if any(k is None for k in node.keys) else ("keys", "values")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return ("operand",)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return ("left", "right")
    if isinstance(node, ast.BoolOp):
        return ("values",)
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        return ("left", "comparators")
    if isinstance(node, ast.IfExp):
        return ("test", "body", "orelse")
    if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
        return ("value", "slice")
    if isinstance(node, ast.Call) and _dotted(node.func) in TRUSTED_CALLS and not any(
        isinstance(a, ast.Starred) for a in node.args
    ) and all(k.arg is not None for k in node.keywords):
        return ("args", "keywords")
    return None


def _dotted(node: ast.expr) -> str | None:
    """``name`` or ``module.name`` for a Name or one-level Attribute; ``type(None)`` too."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    if isinstance(node, ast.Call) and ast.unparse(node) == "type(None)":
        return "type(None)"
    return None


def evaluate(expression: ast.expr, probes: Mapping[int, Any]) -> Any:
    """The value of a split expression, given the probes' decoded values (by step index).

    Raises what Python would (TypeError, ZeroDivisionError, ...) and `LookupError` for a probe
    the sandbox did not answer; a caller treats any exception as a failed check.
    """
    node = expression
    if isinstance(node, ast.Constant):
        return node.value
    name = _dotted(node)
    if name is not None and name in TRUSTED_NAMES:
        return TRUSTED_NAMES[name]
    if isinstance(node, ast.Name) and node.id.startswith(_PROBE):
        return probes[int(node.id[len(_PROBE):])]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [evaluate(e, probes) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        return {evaluate(k, probes): evaluate(v, probes) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](evaluate(node.operand, probes))
    if isinstance(node, ast.BinOp):
        return _arithmetic(node.op, evaluate(node.left, probes), evaluate(node.right, probes))
    if isinstance(node, ast.BoolOp):
        return _boolean(node, probes)
    if isinstance(node, ast.Compare):
        return _compare(node, probes)
    if isinstance(node, ast.IfExp):
        chosen = node.body if evaluate(node.test, probes) else node.orelse
        return evaluate(chosen, probes)
    if isinstance(node, ast.Subscript):
        return evaluate(node.value, probes)[evaluate(node.slice, probes)]
    if isinstance(node, ast.Call):
        function = TRUSTED_CALLS[_dotted(node.func)]  # type: ignore[index]
        args = [evaluate(a, probes) for a in node.args]
        kwargs = {k.arg: evaluate(k.value, probes) for k in node.keywords}
        return function(*args, **kwargs)  # type: ignore[misc]
    raise TypeError(f"cannot evaluate {ast.unparse(node)!r} outside the sandbox")


def _boolean(node: ast.BoolOp, probes: Mapping[int, Any]) -> Any:
    value: Any = None
    for operand in node.values:
        value = evaluate(operand, probes)
        if isinstance(node.op, ast.And) and not value:
            return value
        if isinstance(node.op, ast.Or) and value:
            return value
    return value


def _compare(node: ast.Compare, probes: Mapping[int, Any]) -> bool:
    left = evaluate(node.left, probes)
    for op, comparator in zip(node.ops, node.comparators):
        right = evaluate(comparator, probes)
        if not _COMPARE[type(op)](left, right):
            return False
        left = right
    return True


def _arithmetic(op: ast.operator, left: Any, right: Any) -> Any:
    """``left op right``, refusing results too big to compute quickly."""
    for value in (left, right):
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise OverflowError("integer too large to compare")
    if isinstance(op, ast.Pow) and isinstance(right, int) and abs(right) > 1024:
        raise OverflowError("exponent too large")
    if isinstance(op, ast.Mod) and isinstance(left, (str, bytes)):
        raise TypeError("string formatting is not evaluated outside the sandbox")
    if isinstance(op, ast.Mult) and isinstance(left, (int, str, bytes, list, tuple)) and \
            isinstance(right, (int, str, bytes, list, tuple)):
        sizes = [len(v) if not isinstance(v, int) else 1 for v in (left, right)]
        counts = [v for v in (left, right) if isinstance(v, int)]
        if max(sizes) * max([abs(c) for c in counts] or [1]) > MAX_SEQUENCE:
            raise OverflowError("repeated sequence too large")
    return _BINARY[type(op)](left, right)


def decode_value(data: Any, depth: int = 0) -> Any:
    """A value from the sandbox's tagged JSON: scalars as they are; ``{"list": [...]}``,
    ``{"tuple": ...}``, ``{"set": ...}``, ``{"frozenset": ...}``, ``{"dict": [[k, v], ...]}``,
    ``{"float": "nan"|"inf"|"-inf"}`` and ``{"bytes": HEX}``. Raises ValueError otherwise."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not dict or len(data) != 1:
        raise ValueError("malformed value from the sandbox")
    (tag, body), = data.items()
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"malformed {tag} from the sandbox")
    if tag == "dict":
        if not all(type(pair) is list and len(pair) == 2 for pair in body):
            raise ValueError("malformed dict from the sandbox")
        return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in body}
    containers = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
    if tag not in containers:
        raise ValueError(f"unknown value tag {tag!r} from the sandbox")
    return containers[tag](decode_value(item, depth + 1) for item in body)
