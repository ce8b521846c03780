"""Several rewards per task: a weighted sum of named components.

On the command line a composite is written ``SPEC + WEIGHT*SPEC ...``, for example
``--reward math=math+0.2*format`` (the task ``math`` scores ``1.0*math + 0.2*format``). A term
whose reward takes a value (``regex:PATTERN``, ``format:STYLE``) runs to the end of the text, so
write it last. In a mix spec the same is ``reward = ["math", "format"]``, ``weights = [1, 0.2]``.

The total is the reward that enters the advantages; each component's own value is kept in
rollouts.jsonl as ``reward_components`` (keyed by the component's spec, e.g. ``math``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.registry import SPEC_ARGUMENT, RewardSpec, resolve_reward

_WEIGHT = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*")
_NAME = re.compile(r"[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class CompositeReward:
    """A task's reward: components (name, weight, reward) summed with their weights."""

    terms: tuple[tuple[str, float, RewardSpec], ...]

    @property
    def name(self) -> str:
        """The composite written back in the command-line syntax."""
        return "+".join(n if w == 1.0 else f"{w:g}*{n}" for n, w, _ in self.terms)

    def score(self, completion: str, answer: Any, **context: Any) -> tuple[float, dict[str, float]]:
        """The weighted total and each component's value, for one completion (`answer` as the
        data stores it)."""
        components = {name: _call(name, spec, completion, answer, context)
                      for name, _, spec in self.terms}
        for name, value in components.items():
            if not math.isfinite(value):
                raise UserInputError(f"reward {name!r} returned {value}; rewards must be finite")
        total = sum(weight * components[name] for name, weight, _ in self.terms)
        return float(total), components


def _call(name: str, spec: RewardSpec, completion: str, answer: str | None,
          context: dict[str, Any]) -> float:
    """One component's value; a reward that raises is reported in one line, not a traceback."""
    try:
        return spec(completion, answer, **context)
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001  (the user's function may raise anything)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserInputError(f"reward {name!r} raised {type(exc).__name__}: {first}") from None


def split_terms(text: str) -> list[tuple[float, str]]:
    """``math+0.2*format`` -> [(1.0, "math"), (0.2, "format")]; see the module docstring."""
    terms: list[tuple[float, str]] = []
    rest = text.strip()
    while rest:
        found = _WEIGHT.match(rest)
        weight = float(found.group(1)) if found else 1.0
        body = rest[found.end():] if found else rest
        name = _NAME.match(body)
        if name is not None and name.group(0) in SPEC_ARGUMENT and body[name.end():].startswith(":"):
            term, rest = body, ""
        else:
            term, _, rest = body.partition("+")
        if not term.strip():
            raise UserInputError(f"reward {text!r}: empty term; write e.g. math+0.2*format")
        terms.append((weight, term.strip()))
    if not terms:
        raise UserInputError("empty reward spec; name a reward such as exact or math")
    return terms


def build_composite(
    specs: Sequence[str],
    weights: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
) -> CompositeReward:
    """A composite from component specs, their weights (default 1.0) and reward options.

    `options` entries whose key names a component and whose value is a table apply to that
    component only; the other entries apply to every component.
    """
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs):
        raise UserInputError(
            f"{len(specs)} reward(s) but {len(weights)} weight(s): give one weight per reward"
        )
    options = dict(options or {})
    shared = {k: v for k, v in options.items() if not (k in specs and isinstance(v, Mapping))}
    terms = []
    for spec_text, weight in zip(specs, weights):
        if spec_text in (name for name, _, _ in terms):
            raise UserInputError(f"reward {spec_text!r} appears twice in one task's rewards")
        spec = resolve_reward(spec_text)
        own = options.get(spec_text) if isinstance(options.get(spec_text), Mapping) else {}
        spec = replace(spec, options={**spec.options, **shared, **own})
        terms.append((spec_text, float(weight), spec))
    return CompositeReward(tuple(terms))


def parse_composite(text: str) -> CompositeReward:
    """A command-line reward spec, plain (``math``) or composite (``math+0.2*format``)."""
    terms = split_terms(text)
    return build_composite([spec for _, spec in terms], [weight for weight, _ in terms])


def as_composite(reward: RewardSpec | CompositeReward) -> CompositeReward:
    """A plain `RewardSpec` as a one-component composite; a composite as it is."""
    if isinstance(reward, CompositeReward):
        return reward
    return CompositeReward(((reward.name, 1.0, reward),))
