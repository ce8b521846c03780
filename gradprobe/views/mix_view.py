"""The console view of `gradprobe mix inspect`: a mix's tasks, mappings and one sample prompt each.

The computing half (`sample_prompts`) is plain data; `render_mix` only lays it out with rich.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradprobe.mix.records import Mix, PromptRecord


@dataclass(frozen=True)
class SamplePrompt:
    """One task's first prompt: as the model sees it (or raw), its token count and answer."""

    record: PromptRecord
    text: str
    n_tokens: int | None
    templated: bool


def sample_prompts(mix: Mix, tokenizer: Any | None) -> dict[str, SamplePrompt]:
    """The first prompt of every task, through the chat template and tokenizer when given.

    With a tokenizer the text is the decoded prompt tokens, exactly what sampling feeds the
    model (special tokens included); without one it is the raw prompt.
    """
    from gradprobe.mix.loading import render_prompt

    samples = {}
    for task, records in mix.by_task().items():
        record = records[0]
        if tokenizer is None:
            text = record.prompt if isinstance(record.prompt, str) else json.dumps(record.prompt, indent=1)
            samples[task] = SamplePrompt(record, text, None, False)
            continue
        from gradprobe.rollouts import encode_prompt

        ids = encode_prompt(tokenizer, record, render_prompt(tokenizer, record.prompt))
        samples[task] = SamplePrompt(record, tokenizer.decode(ids), len(ids), True)
    return samples


def _reward_cell(mix: Mix, task: str, rewards: dict[str, dict[str, str]] | None = None) -> str:
    if rewards is not None:  # what a scan with the same --reward options would use
        return f"{rewards[task]['spec']} ({rewards[task]['source']})"
    source = mix.sources.get(task)
    if source is None or not source.reward:
        return "from --reward"
    return " + ".join(r if w == 1.0 else f"{w:g}*{r}" for r, w in zip(source.reward, source.reward_weights))


def task_overview(mix: Mix, rewards: dict[str, dict[str, str]] | None = None) -> Table:
    """One row per task: prompt count, file format and column convention, reward, mix weight."""
    table = Table(title=f"Mix {mix.source} ({mix.format})", title_justify="left")
    for header in ("task", "prompts", "format", "reward", "mix_weight"):
        table.add_column(header, justify="right" if header in ("prompts", "mix_weight") else "left")
    counts = {task: len(records) for task, records in mix.by_task().items()}
    for task in mix.tasks:
        source = mix.sources[task]
        table.add_row(Text(task), str(counts[task]), f"{source.format}/{source.convention}",
                      Text(_reward_cell(mix, task, rewards)), f"{source.weight:g}")
    return table


def field_table(mix: Mix) -> Table:
    """One row per task: where its data is and which column fills each role."""
    table = Table(title="Field mapping (role <- column)", title_justify="left")
    for header in ("task", "data", "task <-", "prompt <-", "answer <-"):
        table.add_column(header, overflow="fold")
    spec = mix.format == "toml"
    for task in mix.tasks:
        fields = mix.sources[task].fields
        task_column = "(spec task)" if spec else fields.get("task") or "(file name)"
        cells = [task, mix.sources[task].data, task_column, str(fields.get("prompt")),
                 fields.get("answer") or "(none)"]
        table.add_row(*(Text(cell) for cell in cells))
    return table


def render_mix(mix: Mix, samples: dict[str, SamplePrompt],
               rewards: dict[str, dict[str, str]] | None = None) -> RenderableType:
    """The whole `mix inspect` output as one rich renderable."""
    parts: list[RenderableType] = [task_overview(mix, rewards), field_table(mix)]
    for task, sample in samples.items():
        how = f"{sample.n_tokens} tokens, as the model sees it" if sample.templated else "raw"
        body = Text(sample.text)
        body.append(f"\n\nanswer: {sample.record.answer}", style="dim")
        title = Text(f"{task}: {sample.record.prompt_id} ({how})")
        parts.append(Panel(body, title=title, title_align="left"))
    if samples and not next(iter(samples.values())).templated:
        parts.append(Text("Raw prompts shown: pass --model MODEL to see them with its chat template "
                          "and tokenizer, exactly as the scan feeds them.", style="yellow"))
    return Group(*parts)
