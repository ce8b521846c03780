"""The streaming engine on CUDA (skipped without a GPU): a bf16 model with float32 sums against
the same model in float64 on the CPU, and host-resident sums against device sums."""

from __future__ import annotations

import pytest
import torch

from test_gradients_exact import gradprobe_run, make_model, make_rollouts, task_sums

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_model_with_float32_sums_on_cuda():
    reference_model = make_model("qwen2")
    rollouts = make_rollouts(seed=9)
    _, reference, _ = gradprobe_run(reference_model, rollouts, "grpo", "grpo", engine="hooks")
    model = make_model("qwen2").to("cuda", torch.bfloat16)
    from gradprobe.advantages import ADVANTAGES
    from gradprobe.gradients.hooked import HookedEngine
    from gradprobe.gradients.layout import build_units
    from gradprobe.objective import LOSSES
    from gradprobe.scoring import assign_advantages
    from test_gradients_exact import MAX_NEW, TEMPERATURE

    batch, layout = build_units(assign_advantages(rollouts, ADVANTAGES.get("grpo")), LOSSES.get("grpo"), MAX_NEW)
    names = [n for n, _ in model.named_parameters()]
    for sums_device in (None, "cpu"):
        result = HookedEngine(model, names, TEMPERATURE, sums_device=sums_device).run(batch, layout.reductions())
        assert all(v.dtype == torch.float32 for v in result.sums.values())
        ours = task_sums(result, model, len(layout.tasks)).double().cpu()
        ref = task_sums(reference, reference_model, len(layout.tasks))
        # bf16 weights and activations: agreement to bf16's precision, not float64's
        assert (ours - ref).norm() / ref.norm() < 0.05
        assert torch.allclose(result.prompt_gram, reference.prompt_gram, rtol=0.1, atol=1e-3 * reference.prompt_gram.abs().max())
