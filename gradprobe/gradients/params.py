"""Which parameters a scan differentiates (`--params`), and the module group of each.

Selection is by presets or glob patterns on parameter names. Groups are what the per-module
breakdown reports: embeddings, each block's attention and MLP, norms, head (docs/metrics.md, "Task
gradients"). Tied weights appear once, under their first name (usually the embedding).
"""

from __future__ import annotations

import fnmatch
import re

import torch

from gradprobe.errors import UserInputError

PRESETS: dict[str, str] = {
    "all": "every trainable parameter",
    "last-block": "the last transformer block",
    "attention": "every attention projection",
    "mlp": "every MLP projection",
    "lora": "a loaded PEFT adapter's parameters",
}

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to, from names like ``model.layers.3.mlp...``."""
    found = _BLOCK.search(name)
    return int(found.group(1)) if found else None


def module_group(name: str) -> str:
    """The per-module group of a parameter name: embeddings, blockN.attention/mlp, norms, head."""
    lowered = name.lower()
    if "norm" in lowered or "ln_" in lowered:
        return "norms"
    block = block_index(name)
    if block is not None:
        if any(key in lowered for key in ("attn", "attention")):
            return f"block{block}.attention"
        if any(key in lowered for key in ("mlp", "feed_forward", "ffn")):
            return f"block{block}.mlp"
        return f"block{block}.other"
    if "embed" in lowered or "wte" in lowered or "wpe" in lowered:
        return "embeddings"
    if "lm_head" in lowered or "output" in lowered:
        return "head"
    return "other"


def _matches_preset(preset: str, name: str, last_block: int | None) -> bool:
    group = module_group(name)
    if preset == "all":
        return True
    if preset == "last-block":
        return last_block is not None and block_index(name) == last_block
    if preset == "attention":
        return group.endswith(".attention")
    if preset == "mlp":
        return group.endswith(".mlp")
    if preset == "lora":
        return "lora_" in name
    raise AssertionError(preset)


def select_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Names of the parameters matched by any preset or glob in `patterns`, in model order.

    Only trainable parameters count (a PEFT model freezes its base), unless nothing is
    trainable, as when a plain model was put in no-grad mode.
    """
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad] or [n for n, _ in named]
    blocks = [b for b in (block_index(n) for n in trainable) if b is not None]
    last_block = max(blocks) if blocks else None
    chosen = []
    for name in trainable:
        for pattern in patterns:
            if pattern in PRESETS:
                hit = _matches_preset(pattern, name, last_block)
            else:
                hit = fnmatch.fnmatchcase(name, pattern)
            if hit:
                chosen.append(name)
                break
    if not chosen:
        raise UserInputError(
            f"--params {' '.join(patterns)} matches no trainable parameter; use a preset "
            f"({', '.join(PRESETS)}) or a glob such as 'model.layers.0.*' "
            f"(first names: {', '.join(trainable[:3])})"
        )
    return chosen
