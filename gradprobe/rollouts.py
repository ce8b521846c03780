"""Rollouts: sampling completions with `generate`, or reading the ones a trainer produced.

A rollout is one completion of one prompt. The completion tokens are those generated up to and
including the first end-of-sequence token; padding never counts (docs/metrics.md, "Rollouts and
losses").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradprobe.errors import UserInputError
from gradprobe.mix.conventions import answer_text
from gradprobe.mix.records import PromptRecord


@dataclass
class Rollout:
    """One sampled completion, its reward and advantage.

    `prompt` is the text the model saw; `chat_prompt` the chat messages it was written as (None
    for a plain-text prompt), for reward functions that take them (TRL's). `answer` is the
    reference as the data stores it (text, or verl's dict or list ground truth).
    """

    task: str
    prompt_id: str
    sample: int
    prompt: str
    completion: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    answer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    chat_prompt: list[dict[str, Any]] | None = None
    reward: float | None = None
    reward_components: dict[str, float] = field(default_factory=dict)
    advantage: float | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.completion_token_ids)


def completion_tokens(generated: list[int], eos_ids: set[int]) -> list[int]:
    """The generated tokens up to and including the first EOS; all of them if none."""
    for i, token in enumerate(generated):
        if token in eos_ids:
            return generated[: i + 1]
    return generated


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends generation: the generation config's (maybe a list) and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if not ids:
        raise UserInputError("the tokenizer has no eos_token: set one in tokenizer_config.json")
    return ids


@torch.no_grad()
def sample_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: list[PromptRecord],
    rendered: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    encoded_prompts: list[list[int]] | None = None,
) -> list[Rollout]:
    """K completions of each prompt with batched, left-padded `generate`, seeded.

    `rendered` holds each prompt as the model sees it (chat template applied), and
    `encoded_prompts` its token ids where already checked (`encode_prompts`). `on_batch(n)` is
    called with the number of prompts done after each batch.
    """
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    rollouts: list[Rollout] = []
    for start in range(0, len(prompts), batch_size):
        records = prompts[start : start + batch_size]
        texts = rendered[start : start + batch_size]
        encoded = encoded_prompts[start : start + batch_size] if encoded_prompts is not None else \
            [encode_prompt(tokenizer, r, t) for t, r in zip(texts, records)]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=group_size,
            pad_token_id=pad_id,
            eos_token_id=sorted(eos),
        ).cpu()
        for row, generated in enumerate(out[:, width:].tolist()):
            record, text = records[row // group_size], texts[row // group_size]
            tokens = completion_tokens(generated, eos)
            rollouts.append(
                Rollout(
                    task=record.task,
                    prompt_id=record.prompt_id,
                    sample=row % group_size,
                    prompt=text,
                    completion=tokenizer.decode(tokens, skip_special_tokens=True),
                    prompt_token_ids=encoded[row // group_size],
                    completion_token_ids=tokens,
                    answer=record.answer,
                    extra=record.extra,
                    chat_prompt=record.prompt if isinstance(record.prompt, list) else None,
                )
            )
        if on_batch is not None:
            on_batch(len(records))
    return rollouts


def encode_prompt(tokenizer: Any, record: PromptRecord, rendered: str) -> list[int]:
    """The prompt's token ids as sampling feeds them to the model."""
    # A chat template already wrote BOS and friends into the text.
    adds_special = not (isinstance(record.prompt, list) and tokenizer.chat_template)
    return tokenizer(rendered, add_special_tokens=adds_special).input_ids


def max_positions(model: Any) -> int | None:
    """How many positions the model has (n_positions, max_position_embeddings, ...), if known."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(
    tokenizer: Any, records: list[PromptRecord], rendered: list[str], model: Any,
    max_new_tokens: int, truncate: bool = False,
) -> list[list[int]]:
    """Every prompt's token ids, checked to leave `max_new_tokens` within the model's positions.

    A longer prompt is a `UserInputError` (GPT-2 would fail mid-scan, RoPE models would quietly
    extrapolate), unless `truncate`, which keeps each such prompt's last tokens.
    """
    limit = max_positions(model)
    encoded = [encode_prompt(tokenizer, r, t) for r, t in zip(records, rendered)]
    if limit is None:
        return encoded
    room = limit - max_new_tokens
    if room < 1:
        raise UserInputError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                             f"model's {limit} positions; lower it")
    for i, (record, ids) in enumerate(zip(records, encoded)):
        if len(ids) > room and truncate:
            encoded[i] = ids[-room:]
        elif len(ids) > room:
            raise UserInputError(
                f"prompt {record.prompt_id!r} of task {record.task!r} has {len(ids)} tokens; with "
                f"--max-new-tokens {max_new_tokens} it needs more than the model's {limit} "
                "positions: shorten it, lower --max-new-tokens, or pass --truncate-prompts "
                "(keeps its last tokens)"
            )
    return encoded


ROLLOUT_REQUIRED = ("task", "prompt_id", "prompt", "completion", "reward")


def rollout_to_json(rollout: Rollout, extra_fields: dict[str, Any] | None = None) -> str:
    """One rollouts.jsonl line: enough to recompute every gradient independently."""
    record = {
        "task": rollout.task,
        "prompt_id": rollout.prompt_id,
        "sample": rollout.sample,
        "prompt": rollout.prompt,
        "completion": rollout.completion,
        "answer": answer_text(rollout.answer),
        "prompt_token_ids": rollout.prompt_token_ids,
        "completion_token_ids": rollout.completion_token_ids,
        "reward": rollout.reward,
        "reward_components": rollout.reward_components,
        "advantage": rollout.advantage,
        "n_tokens": rollout.n_tokens,
    }
    record.update(extra_fields or {})
    return json.dumps(record, ensure_ascii=False)


def read_rollouts(path: Path, tokenizer: Any, model: Any) -> list[Rollout]:
    """Rollouts a trainer produced (JSONL or Parquet, via `datasets`), without sampling.

    Required columns: task, prompt_id, prompt, completion, reward. Optional: sample,
    prompt_token_ids and completion_token_ids (else the texts are tokenized and EOS is appended
    to each completion, as a finished generation ends with it), answer.
    """
    from gradprobe.mix.loading import load_table

    table = load_table(path)
    missing = [c for c in ROLLOUT_REQUIRED if c not in table.column_names]
    if missing:
        raise UserInputError(
            f"{path}: rollouts file lacks column(s) {', '.join(missing)}; it needs "
            f"{', '.join(ROLLOUT_REQUIRED)} (token id columns are optional)"
        )
    eos = min(eos_token_ids(model, tokenizer))
    vocabulary = model.get_input_embeddings().num_embeddings
    limit = max_positions(model)
    samples: dict[tuple[str, str], int] = {}
    rollouts = []
    for i, row in enumerate(table):
        key = (str(row["task"]), str(row["prompt_id"]))
        sample = row.get("sample")
        samples[key] = samples.get(key, -1) + 1
        reward = _check_reward(path, i + 1, row["reward"])
        prompt_ids = row.get("prompt_token_ids") or tokenizer(str(row["prompt"])).input_ids
        completion_ids = row.get("completion_token_ids")
        if not completion_ids:
            completion_ids = tokenizer(str(row["completion"]), add_special_tokens=False).input_ids
            completion_ids = [*completion_ids, eos]
        _check_token_ids(path, i + 1, [*prompt_ids, *completion_ids], vocabulary, limit)
        rollouts.append(
            Rollout(
                task=key[0],
                prompt_id=key[1],
                sample=int(sample) if sample is not None else samples[key],
                prompt=str(row["prompt"]),
                completion=str(row["completion"]),
                prompt_token_ids=list(prompt_ids),
                completion_token_ids=list(completion_ids),
                answer=None if row.get("answer") is None else str(row["answer"]),
                reward=reward,
            )
        )
    if not rollouts:
        raise UserInputError(f"{path}: the rollouts file has no rows")
    return rollouts


def _check_reward(path: Path, row: int, reward: Any) -> float:
    """A row's reward as a float; anything but a finite number is a `UserInputError`."""
    if reward is None:
        raise UserInputError(f"{path}: row {row} has no reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise UserInputError(f"{path}: row {row} has reward {reward!r}; rewards must be finite numbers")
    return float(reward)


def _check_token_ids(path: Path, row: int, ids: list[Any], vocabulary: int, limit: int | None) -> None:
    """Token ids must be integers the model's embedding has, and fit its positions."""
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocabulary:
            raise UserInputError(
                f"{path}: row {row} has token id {token!r}, outside the model's vocabulary "
                f"(0..{vocabulary - 1}); were these rollouts made with another tokenizer?"
            )
    if limit is not None and len(ids) > limit:
        raise UserInputError(f"{path}: row {row} has {len(ids)} prompt and completion tokens, more "
                             f"than the model's {limit} positions")
