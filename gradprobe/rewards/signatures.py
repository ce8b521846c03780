"""Reward functions as gradprobe, verl and TRL write them, told apart by their parameter names.

- ``trl``, a parameter named ``completions``: TRL's ``f(prompts, completions, **kwargs) ->
  list[float]``. Called for one completion as TRL's trainers call it: ``prompts=[prompt]`` (the
  chat messages when the prompt is chat, else its text), ``completions=[completion]`` (as
  ``[{"role": "assistant", "content": ...}]`` for a chat prompt), and every column of the row as a
  one-item list (``task``, and the answer as ``answer`` unless a column has that name). The first
  item of the list it returns is the reward; None (TRL's "does not apply") is an error here,
  where each task has its own reward.
- ``verl``, a parameter named ``solution_str``: verl's ``compute_score(data_source,
  solution_str, ground_truth, extra_info=None)`` (or a single source's ``compute_score(
  solution_str, ground_truth, ...)``). Called with keywords as verl's reward manager calls it:
  ``data_source`` (the row's column, else the task), the completion, the ground truth as the
  data stores it (a dict for countdown, a list where the Parquet holds a list) and the row's
  ``extra_info``; only the parameters the function declares (all of them with ``**kwargs``).
  It may return a number or a dict with ``score``, as verl allows.
- ``gradprobe``, any other: ``fn(completion, answer, prompt=..., task=..., **columns) -> float``
  with the answer as text (structured ground truths as JSON).

Spec options (``regex:PATTERN``, a mix spec's ``options``) are keyword arguments in all three.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.mix.conventions import answer_text

Caller = Callable[[Callable[..., Any], str, Any, Mapping[str, Any], Mapping[str, Any]], float]
# Convention -> the parameter whose presence marks it, checked in this order.
MARKERS = {"trl": "completions", "verl": "solution_str"}


def calling_convention(fn: Callable[..., Any]) -> str:
    """``trl``, ``verl`` or ``gradprobe``: how `fn` expects to be called, from its parameters."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature: gradprobe's convention
        return "gradprobe"
    return next((name for name, marker in MARKERS.items() if marker in parameters), "gradprobe")


def call_reward(
    convention: str, fn: Callable[..., Any], completion: str, answer: Any,
    options: Mapping[str, Any], context: Mapping[str, Any],
) -> Any:
    """`fn`'s reward for one completion, called as its convention expects (the value as it
    returned it: the caller checks that it is a number).

    `context` holds ``prompt`` (the text the model saw), ``task``, ``chat_prompt`` (the chat
    messages, or None) and the row's other columns.
    """
    return CALLERS[convention](fn, completion, answer, options, context)


def _gradprobe(fn: Callable[..., Any], completion: str, answer: Any, options: Mapping[str, Any],
               context: Mapping[str, Any]) -> Any:
    columns = {k: v for k, v in context.items() if k != "chat_prompt"}
    return fn(completion, answer_text(answer), **options, **columns)


def _verl(fn: Callable[..., Any], completion: str, answer: Any, options: Mapping[str, Any],
          context: Mapping[str, Any]) -> Any:
    offered = {"data_source": context.get("data_source", context.get("task")),
               "solution_str": completion, "ground_truth": answer,
               "extra_info": context.get("extra_info"), **options}
    result = fn(**_accepted(fn, offered))
    if isinstance(result, Mapping):
        if "score" not in result:
            raise UserInputError(f"reward {_name(fn)} returned a dict without 'score' ({sorted(result)})")
        result = result["score"]
    return result


def _trl(fn: Callable[..., Any], completion: str, answer: Any, options: Mapping[str, Any],
         context: Mapping[str, Any]) -> Any:
    chat = context.get("chat_prompt")
    prompt = chat if chat is not None else context.get("prompt")
    written = [{"role": "assistant", "content": completion}] if chat is not None else completion
    columns = {k: [v] for k, v in context.items() if k not in ("prompt", "chat_prompt")}
    columns.setdefault("answer", [answer])
    result = fn(prompts=[prompt], completions=[written], **columns, **options)
    if not isinstance(result, (list, tuple)) or len(result) != 1:
        raise UserInputError(f"reward {_name(fn)} (TRL-style, completions=...) must return a list "
                             f"with one reward per completion; got {result!r}")
    if result[0] is None:
        raise UserInputError(f"reward {_name(fn)} returned None for task {context.get('task')!r}: "
                             "each task needs a reward that applies to it")
    return result[0]


def _accepted(fn: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `fn` takes: all with ``**kwargs``, else those it names."""
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return offered
    return {k: v for k, v in offered.items() if k in parameters}


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


CALLERS: dict[str, Caller] = {"gradprobe": _gradprobe, "verl": _verl, "trl": _trl}
