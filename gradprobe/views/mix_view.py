"""The console view of `gradprobe mix inspect`: a mix's tasks, mappings and one sample prompt each.

The computing half (`sample_prompts`) is plain data; `render_mix` only lays it out with rich.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradprobe.mix.conventions import answer_text
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
    split = f", split {mix.split}" if mix.split else ""
    table = Table(title=f"Mix {mix.source} ({mix.format}{split})", title_justify="left")
    for header in ("task", "prompts", "format", "reward", "mix_weight"):
        table.add_column(header, justify="right" if header in ("prompts", "mix_weight") else "left")
    counts = {task: len(records) for task, records in mix.by_task().items()}
    for task in mix.tasks:
        source = mix.sources[task]
        table.add_row(Text(task), str(counts[task]), f"{source.format}/{source.convention}",
                      Text(_reward_cell(mix, task, rewards)), f"{source.weight:g}")
    return table


# Where a task's name comes from when no column holds it, by the mix's (or the task's) format.
_NAMED_BY = {"toml": "(spec task)", "datasets-dir": "(folder name)", "data-folder": "(path in folder)"}


def task_origin(mix_format: str, source: Mapping[str, Any]) -> str:
    """What names a task: its column, the spec, or the file or folder it was read from."""
    if mix_format == "toml":
        return _NAMED_BY["toml"]
    return source["fields"].get("task") or _NAMED_BY.get(mix_format, "(file name)")


def mix_lines(mix: Mapping[str, Any] | None) -> list[str]:
    """How a mix was read, from scan.json's ``mix``: one line with the detected format and
    convention and what names the tasks (grouped when tasks differ), then any advice."""
    if not mix or not mix.get("tasks"):
        return []
    groups: dict[str, list[str]] = {}
    for task, source in mix["tasks"].items():
        how = f"{source['format']}/{source['convention']}, task <- {task_origin(mix['format'], source)}"
        groups.setdefault(how, []).append(task)
    split = f" [{mix['split']}]" if mix.get("split") else ""
    body = next(iter(groups)) if len(groups) == 1 else "; ".join(
        f"{', '.join(tasks)} {how}" for how, tasks in groups.items())
    return [f"mix {mix['path']}{split}: {body}", *mix.get("notes", [])]


def field_table(mix: Mix) -> Table:
    """One row per task: where its data is and which column fills each role."""
    table = Table(title="Field mapping (role <- column)", title_justify="left")
    for header in ("task", "data", "task <-", "prompt <-", "answer <-"):
        table.add_column(header, overflow="fold")
    for task in mix.tasks:
        fields = mix.sources[task].fields
        cells = [task, mix.sources[task].data, task_origin(mix.format, {"fields": fields}),
                 str(fields.get("prompt")), fields.get("answer") or "(none)"]
        table.add_row(*(Text(cell) for cell in cells))
    return table


def render_mix(mix: Mix, samples: dict[str, SamplePrompt],
               rewards: dict[str, dict[str, str]] | None = None) -> RenderableType:
    """The whole `mix inspect` output as one rich renderable."""
    parts: list[RenderableType] = [task_overview(mix, rewards), field_table(mix)]
    parts += [Text(note, style="yellow") for note in mix.notes]
    for task, sample in samples.items():
        how = f"{sample.n_tokens} tokens, as the model sees it" if sample.templated else "raw"
        body = Text(sample.text)
        body.append(f"\n\nanswer: {answer_text(sample.record.answer)}", style="dim")
        title = Text(f"{task}: {sample.record.prompt_id} ({how})")
        parts.append(Panel(body, title=title, title_align="left"))
    if samples and not next(iter(samples.values())).templated:
        parts.append(Text("Raw prompts shown: pass --model MODEL to see them with its chat template "
                          "and tokenizer, exactly as the scan feeds them.", style="yellow"))
    return Group(*parts)
