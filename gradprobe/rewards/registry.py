"""The reward registry and how `--reward` specs resolve to functions.

A reward function scores one completion: ``fn(completion, answer, **context) -> float``. The
context holds ``prompt``, ``task``, the options of the spec (``regex:PATTERN`` gives
``pattern=PATTERN``) and any extra columns of the mix row, as TRL hands them to its reward
functions. Functions must accept ``**context`` and ignore what they do not use. Imported
functions (``package.module:function``) may instead be written as verl's ``compute_score`` or
TRL's reward functions, and are called as those trainers call them (`gradprobe.rewards.signatures`).

A task's reward may combine several of them with weights (`gradprobe.rewards.composite`).
"""

from __future__ import annotations

import importlib
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradprobe.errors import UserInputError
from gradprobe.registry import Registry
from gradprobe.rewards.signatures import call_reward, calling_convention

if TYPE_CHECKING:
    from gradprobe.rewards.composite import CompositeReward

RewardFn = Callable[..., float]

REWARDS: Registry[RewardFn] = Registry("reward")

# The option name the text after "NAME:" fills, per reward that takes one.
SPEC_ARGUMENT: dict[str, str] = {}
# Rewards whose "NAME:VALUE" value may be left out (the function's default applies).
OPTIONAL_ARGUMENT: set[str] = set()
# Rewards that run model-written code: they take an ``isolation`` option (--allow-weak-sandbox).
RUNS_CODE: set[str] = set()


@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: the function, its display name, its options and how it is called
    (``gradprobe``, ``verl`` or ``trl``: `gradprobe.rewards.signatures`)."""

    name: str
    fn: RewardFn
    options: dict[str, Any] = field(default_factory=dict)
    convention: str = "gradprobe"

    def __call__(self, completion: str, answer: Any, **context: Any) -> float:
        """The reward of one completion; `answer` as the data stores it (text or a structure)."""
        value = call_reward(self.convention, self.fn, completion, answer, self.options, context)
        if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real) and not hasattr(
            type(value), "__float__"
        ):
            raise UserInputError(
                f"reward {self.name!r} returned {_short_repr(value)} ({type(value).__name__}); "
                "a reward must return a number"
            )
        return float(value)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def register_reward(
    name: str, argument: str | None = None, required: bool = True, runs_code: bool = False
) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register a reward; `argument` names the option that ``NAME:VALUE`` sets
    (which may be left out when not `required`); `runs_code` marks one that executes
    completions (it must accept ``isolation="bwrap"|"weak"``)."""
    if runs_code:
        RUNS_CODE.add(name)
    if argument is not None:
        SPEC_ARGUMENT[name] = argument
        if not required:
            OPTIONAL_ARGUMENT.add(name)
    return REWARDS.register(name)


def resolve_reward(spec: str) -> RewardSpec:
    """Turn ``NAME``, ``NAME:VALUE`` or ``package.module:function`` into a callable reward."""
    name, _, value = spec.partition(":")
    if name in REWARDS:
        options: dict[str, Any] = {}
        if name in SPEC_ARGUMENT and (value or name not in OPTIONAL_ARGUMENT):
            if not value:
                raise UserInputError(
                    f"reward {name!r} needs a value: write {name}:{SPEC_ARGUMENT[name].upper()}"
                )
            options[SPEC_ARGUMENT[name]] = value
        elif value:
            raise UserInputError(f"reward {name!r} takes no value, got {spec!r}")
        return RewardSpec(spec, REWARDS.get(name), options)
    if value and all(part.isidentifier() for part in name.split(".")):
        fn = _import_function(name, value)
        return RewardSpec(spec, fn, convention=calling_convention(fn))
    REWARDS.get(name)  # raises with the list of known rewards
    raise AssertionError("unreachable")


def _import_function(module_name: str, attribute: str) -> RewardFn:
    if os.getcwd() not in sys.path:  # console scripts do not put the working directory first
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserInputError(
            f"cannot import reward module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise UserInputError(f"{module_name!r} has no function {attribute!r}")
    return fn


def parse_reward_options(
    specs: list[str],
    tasks: list[str],
    default: str,
    configured: Mapping[str, CompositeReward] | None = None,
) -> dict[str, CompositeReward]:
    """Map every task to its reward from ``--reward TASK=SPEC`` items and a default spec.

    An item without ``TASK=`` sets the default. A SPEC may be composite (``math+0.2*format``,
    `gradprobe.rewards.composite`). `configured` rewards (from a mix spec) apply to their tasks
    unless a ``TASK=`` item names them; the default covers the rest. Unknown tasks and rewards
    are user errors.
    """
    from gradprobe.rewards.composite import parse_composite

    configured = configured or {}
    chosen: dict[str, str] = {}
    for item in specs:
        task, sep, spec = item.partition("=")
        if not sep:
            default = item
            continue
        if task not in tasks:
            raise UserInputError(
                f"--reward names unknown task {task!r}; tasks in the mix: {', '.join(tasks)}"
            )
        chosen[task] = spec
    return {task: configured[task] if task in configured and task not in chosen
            else parse_composite(chosen.get(task, default)) for task in tasks}


def effective_rewards(
    specs: list[str],
    rewards: Mapping[str, CompositeReward],
    configured: Mapping[str, CompositeReward] | None = None,
) -> dict[str, dict[str, str]]:
    """Per task, the reward `parse_reward_options` chose (`spec`, a composite's name) and where
    the choice came from (`source`): scan.json `rewards` and `mix inspect --reward`."""
    configured = configured or {}
    chosen = {task for task, sep, _ in (item.partition("=") for item in specs) if sep}
    default_given = any("=" not in item for item in specs)

    def source(task: str) -> str:
        if task in chosen:
            return f"--reward {task}=..."
        if task in configured:
            return "mix spec"
        return "--reward default" if default_given else "built-in default"

    return {task: {"spec": reward.name, "source": source(task)} for task, reward in rewards.items()}
