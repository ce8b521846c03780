"""The mix stage: task-labelled prompts from files or TOML specs, per-format readers, conventions."""

from gradprobe.mix.conventions import CONVENTIONS
from gradprobe.mix.loading import FORMATS, load_mix, load_table, render_prompt, select_prompts
from gradprobe.mix.records import Mix, PromptRecord, TaskSource

__all__ = ["CONVENTIONS", "FORMATS", "Mix", "PromptRecord", "TaskSource", "load_mix", "load_table",
           "render_prompt", "select_prompts"]
