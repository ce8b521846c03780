"""The embedded demo: a tiny character-level Llama and a held-out four-task mix.

`gradprobe scan --demo` uses the model in `DEMO_MODEL_DIR`, the mix in `DEMO_MIX_PATH` and the
reward per task in `DEMO_REWARDS`. Both are reproduced by ``python -m gradprobe.demo.train``.
Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path

from gradprobe.demo.tasks import TASKS

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = DEMO_DIR / "model"
DEMO_MIX_PATH = DEMO_DIR / "mix.jsonl"

# Task -> reward name ("exact" or "numeric"), as the rewards registry knows them.
DEMO_REWARDS: dict[str, str] = {name: spec.reward for name, spec in TASKS.items()}

__all__ = ["DEMO_DIR", "DEMO_MIX_PATH", "DEMO_MODEL_DIR", "DEMO_REWARDS", "TASKS"]
