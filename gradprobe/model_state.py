"""Leave a model as it was found: what the gradient engines change, saved and put back.

The engines call `model.eval().requires_grad_(False)`, the vmap engine may switch attention to
eager, and a probe inside a training run must not move the run's random numbers or its
accumulated gradients. `preserved_model_state` saves all of that on entry and restores it on
exit, also when the body raises.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ModelState:
    """What a gradient measurement may change on a model and in the process."""

    training: dict[torch.nn.Module, bool]
    requires_grad: dict[torch.nn.Parameter, bool]
    grads: dict[torch.nn.Parameter, torch.Tensor | None]
    attention: str | None
    grad_enabled: bool
    python_rng: Any
    numpy_rng: Any

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelState:
        parameters = list(model.parameters())
        return cls(
            training={m: m.training for m in model.modules()},
            requires_grad={p: p.requires_grad for p in parameters},
            grads={p: p.grad for p in parameters},
            attention=_attention_implementation(model),
            grad_enabled=torch.is_grad_enabled(),
            python_rng=random.getstate(),
            numpy_rng=np.random.get_state(),
        )

    def restore(self, model: torch.nn.Module) -> None:
        for module, training in self.training.items():
            module.training = training
        for parameter, flag in self.requires_grad.items():
            parameter.requires_grad_(flag)
        for parameter, grad in self.grads.items():
            parameter.grad = grad
        if self.attention is not None and _attention_implementation(model) != self.attention:
            model.set_attn_implementation(self.attention)
        torch.set_grad_enabled(self.grad_enabled)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)


def _attention_implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    return implementation if hasattr(model, "set_attn_implementation") else None


@contextmanager
def preserved_model_state(model: torch.nn.Module) -> Iterator[None]:
    """Within the block the model may be changed freely; afterwards its train/eval modes,
    requires_grad flags, .grad tensors and attention implementation are as before, and so are
    torch's (CPU and every CUDA device's), Python's and NumPy's random number generators."""
    state = ModelState.of(model)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        state.restore(model)
