"""The mix stage: task-labelled prompts from files, per-format readers, field mapping."""

from gradprobe.mix.loading import FORMATS, load_mix, load_table, render_prompt, select_prompts
from gradprobe.mix.records import Mix, PromptRecord

__all__ = ["FORMATS", "Mix", "PromptRecord", "load_mix", "load_table", "render_prompt", "select_prompts"]
