"""Per-task and per-prompt gradients against plain float64 autograd, one backward per task.

The reference below recomputes everything from docs/metrics.md's definitions without any gradprobe
code path: advantages by hand, the aggregation's formula, one unpadded forward per completion.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gradprobe.advantages import ADVANTAGES
from gradprobe.demo.charlm import tiny_llama_config, tiny_qwen2_config
from gradprobe.gradients.hooked import HookedEngine
from gradprobe.gradients.vmap_engine import GradientEngine
from gradprobe.gradients.layout import build_units
from gradprobe.gradients.summary import summarise_gradients
from gradprobe.objective import LOSSES
from gradprobe.rollouts import Rollout
from gradprobe.scoring import assign_advantages

VOCAB = 40
MAX_NEW = 7
TEMPERATURE = 0.7


def make_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(1)
    config = (tiny_llama_config if arch == "llama" else tiny_qwen2_config)(
        VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    return AutoModelForCausalLM.from_config(config).double().eval()


def make_rollouts(seed: int = 0, tasks=("a", "b", "c"), prompts=3, k=3) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    rollouts = []
    for t_index, task in enumerate(tasks):
        for p in range(prompts + t_index):  # unequal prompt counts per task
            prompt = rng.integers(3, VOCAB, rng.integers(2, 5)).tolist()
            rewards = rng.integers(0, 2, k).astype(float) + (0.5 if p == 0 else 0.0) * rng.random(k)
            if task == "b" and p == 1:
                rewards[:] = 1.0  # a degenerate group
            for s in range(k):
                completion = rng.integers(3, VOCAB, rng.integers(1, MAX_NEW + 1)).tolist()
                rollouts.append(Rollout(task, f"{task}{p}", s, "", "", prompt, completion,
                                        reward=float(rewards[s])))
    return rollouts


def reference_advantages(rewards: np.ndarray, name: str) -> np.ndarray:
    k = len(rewards)
    if name == "grpo":
        return (rewards - rewards.mean()) / (np.std(rewards, ddof=1) + 1e-4)
    if name == "dr_grpo":
        return rewards - rewards.mean()
    if name == "rloo":
        return np.array([rewards[i] - np.delete(rewards, i).mean() for i in range(k)])
    return rewards.copy()


def completion_logprob_sum(model, rollout: Rollout) -> torch.Tensor:
    ids = torch.tensor([rollout.prompt_token_ids + rollout.completion_token_ids])
    logits = model(ids, use_cache=False).logits[0] / TEMPERATURE
    logp = torch.log_softmax(logits, -1)
    n_prompt = len(rollout.prompt_token_ids)
    return sum(logp[n_prompt + j - 1, tok] for j, tok in enumerate(rollout.completion_token_ids))


def reference_loss(model, rollouts: list[Rollout], advantages: dict, loss: str) -> torch.Tensor:
    """The aggregation's formula, term by term (docs/metrics.md)."""
    n = [r.n_tokens for r in rollouts]
    total = 0.0
    for r in rollouts:
        token_loss_sum = -advantages[id(r)] * completion_logprob_sum(model, r)
        if loss == "grpo":
            total = total + token_loss_sum / (len(rollouts) * r.n_tokens)
        elif loss in ("bnpo", "dapo"):
            total = total + token_loss_sum / sum(n)
        else:
            total = total + token_loss_sum / (len(rollouts) * MAX_NEW)
    return total


def flat_grad(model, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def reference(model, rollouts, advantage: str, loss: str):
    model.requires_grad_(True)
    advantages = {}
    tasks = list(dict.fromkeys(r.task for r in rollouts))
    by_prompt = {}
    for r in rollouts:
        by_prompt.setdefault((r.task, r.prompt_id), []).append(r)
    for group in by_prompt.values():
        for r, a in zip(group, reference_advantages(np.array([r.reward for r in group]), advantage)):
            advantages[id(r)] = a
    task_grads, prompt_vectors = {}, {}
    for task in tasks:
        mine = [r for r in rollouts if r.task == task]
        task_grads[task] = flat_grad(model, reference_loss(model, mine, advantages, loss))
        keys = [k for k in by_prompt if k[0] == task]
        for key in keys:
            # u_p = m * gradient of prompt p's part of the task loss (aggregation over the task).
            part = sum(reference_loss_part(model, mine, by_prompt[key], advantages, loss))
            prompt_vectors[key] = len(keys) * flat_grad(model, part)
    return task_grads, prompt_vectors


def reference_loss_part(model, task_rollouts, members, advantages, loss):
    n_all = [r.n_tokens for r in task_rollouts]
    for r in members:
        term = -advantages[id(r)] * completion_logprob_sum(model, r)
        if loss == "grpo":
            yield term / (len(task_rollouts) * r.n_tokens)
        elif loss in ("bnpo", "dapo"):
            yield term / sum(n_all)
        else:
            yield term / (len(task_rollouts) * MAX_NEW)


def gradprobe_run(model, rollouts, advantage, loss, chunk_size=4, checkpoint=False, engine="vmap",
                  max_tokens=1 << 14, row_dots=True, sums_device=None, names=None, linear_norms="auto"):
    scored = assign_advantages(rollouts, ADVANTAGES.get(advantage))
    batch, layout = build_units(scored, LOSSES.get(loss), MAX_NEW)
    names = names or [n for n, _ in model.named_parameters()]
    if engine == "hooks":
        hooked = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64, sums_device=sums_device,
                              linear_norms=linear_norms)
        result = hooked.run(batch, layout.reductions(), max_tokens=max_tokens, row_dots=row_dots)
    else:
        vmapped = GradientEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64,
                                 checkpoint_activations=checkpoint)
        result = vmapped.run(batch, layout.reductions(), chunk_size=chunk_size, row_dots=row_dots)
    return layout, result, summarise_gradients(result, layout)


def task_sums(result, model, n_tasks) -> torch.Tensor:
    """[T, n_parameters]: g_t = g_t+ + g_t- from the engine's sign sums, in model parameter order."""
    rows = []
    for t in range(n_tasks):
        pos, neg = result.sum_of(2 * t), result.sum_of(2 * t + 1)
        rows.append(torch.cat([(pos[n] + neg[n]).flatten() for n, _ in model.named_parameters()]))
    return torch.stack(rows)


def assert_same_result(a, b, tolerance=1e-10):
    assert torch.allclose(a.prompt_gram, b.prompt_gram, rtol=tolerance, atol=1e-14)
    assert torch.allclose(a.sum_dots, b.sum_dots, rtol=tolerance, atol=1e-14)
    for name in b.sums:
        assert torch.allclose(a.sums[name], b.sums[name], rtol=tolerance, atol=1e-14)
    if b.row_dots is not None:
        assert torch.allclose(a.row_dots, b.row_dots, rtol=tolerance, atol=1e-14)


def out_of_memory_above(call, max_units: int):
    """`call(batch, units)`, raising an out-of-memory error for more than `max_units` units."""

    def limited(batch, units):
        if len(units) > max_units:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return call(batch, units)

    return limited


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("advantage,loss", list(itertools.product(
    ["grpo", "dr_grpo", "rloo", "none"], ["grpo", "bnpo", "dapo", "dr_grpo"])))
def test_task_gradients_match_float64_autograd(advantage, loss, engine):
    model = make_model("llama")
    rollouts = make_rollouts()
    layout, result, summary = gradprobe_run(model, rollouts, advantage, loss, engine=engine)
    ref_grads, ref_prompt_norms = reference(model, rollouts, advantage, loss)
    tasks = layout.tasks
    ref = torch.stack([ref_grads[t] for t in tasks])
    # Task gradients themselves (engine sums, in parameter order of model.named_parameters()).
    ours = task_sums(result, model, len(tasks))
    assert rel(ours, ref) < 1e-6
    dots = ref @ ref.T
    assert rel([summary.tasks[t]["grad_sq_norm"] for t in tasks], dots.diagonal()) < 1e-6
    norms = dots.diagonal().sqrt()
    cos = dots / (norms[:, None] * norms[None, :])
    ours_cos = np.array([[np.nan if v is None else v for v in row] for row in summary.cosine])
    mask = np.isfinite(cos.numpy())
    assert np.abs(ours_cos[mask] - cos.numpy()[mask]).max() < 1e-6
    weights = torch.as_tensor(layout.task_weights)
    g = weights @ ref
    shares = weights * (ref @ g) / (g @ g)
    assert rel([summary.tasks[t]["share"] for t in tasks], shares) < 1e-6
    assert abs(sum(summary.tasks[t]["share"] for t in tasks) - 1) < 1e-9
    ref_norms = [float(ref_prompt_norms[key].norm()) for key in layout.prompt_keys]
    assert rel(summary.prompt_grad_norm, ref_norms) < 1e-6
    for task in tasks:  # U-statistic and its parts from the reference per-prompt vectors
        u = torch.stack([ref_prompt_norms[key] for key in layout.prompt_keys if key[0] == task])
        m = u.shape[0]
        total, squares = float(u.sum(0).norm() ** 2), float((u * u).sum())
        unbiased = (total - squares) / (m * (m - 1))
        assert summary.tasks[task]["grad_sq_norm"] == pytest.approx(total / m**2, rel=1e-6)
        assert summary.tasks[task]["grad_sq_norm_unbiased"] == pytest.approx(unbiased, rel=1e-6, abs=1e-12)
        noise = (squares - m * float(u.mean(0).norm() ** 2)) / (m - 1)
        assert summary.tasks[task]["noise_trace"] == pytest.approx(noise, rel=1e-6, abs=1e-12)
        # The second pass: row sums r_p = <u_p, S_t>, and the jackknife built on them.
        moments = summary.task_moments[task]
        assert rel(moments.row_sums, u @ u.sum(0)) < 1e-6
        assert rel(moments.unit_sq_norms, (u * u).sum(1)) < 1e-6
        loo = torch.stack([(u.sum(0) - u[i]).norm() ** 2 - ((u * u).sum() - (u[i] * u[i]).sum())
                           for i in range(m)]) / ((m - 1) * (m - 2))
        se = float(((m - 1) / m * ((loo - loo.mean()) ** 2).sum()).sqrt())
        assert summary.tasks[task]["grad_sq_norm_unbiased_se"] == pytest.approx(se, rel=1e-6, abs=1e-12)


def test_mixed_weights_follow_the_aggregation():
    rollouts = assign_advantages(make_rollouts(), ADVANTAGES.get("grpo"))
    _, by_completions = build_units(rollouts, LOSSES.get("grpo"), MAX_NEW)
    _, by_tokens = build_units(rollouts, LOSSES.get("bnpo"), MAX_NEW)
    counts = {t: sum(1 for r in rollouts if r.task == t) for t in "abc"}
    tokens = {t: sum(r.n_tokens for r in rollouts if r.task == t) for t in "abc"}
    assert np.allclose(by_completions.task_weights, [counts[t] / sum(counts.values()) for t in "abc"])
    assert np.allclose(by_tokens.task_weights, [tokens[t] / sum(tokens.values()) for t in "abc"])


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tied_and_untied_models(arch, engine):
    """Llama ties lm_head to the embedding (two hooked uses of one tensor); Qwen2 has biases."""
    model = make_model(arch)
    assert model.config.tie_word_embeddings == (arch == "llama")
    rollouts = make_rollouts(seed=3)
    layout, result, summary = gradprobe_run(model, rollouts, "grpo", "grpo", engine=engine)
    ref_grads, ref_prompt = reference(model, rollouts, "grpo", "grpo")
    ref = torch.stack([ref_grads[t] for t in layout.tasks])
    ours = task_sums(result, model, len(layout.tasks))
    assert rel(ours, ref) < 1e-6
    assert rel([summary.tasks[t]["grad_sq_norm"] for t in layout.tasks], (ref * ref).sum(1)) < 1e-6
    assert rel(summary.prompt_grad_norm, [float(ref_prompt[k].norm()) for k in layout.prompt_keys]) < 1e-6


def test_results_do_not_depend_on_chunking():
    model = make_model("llama")
    rollouts = make_rollouts(seed=5)
    _, base, _ = gradprobe_run(model, rollouts, "grpo", "bnpo", chunk_size=64)
    for chunk, units in [(1, 2), (2, 2), (5, 4)]:  # whole prompts (2 units each) per chunk
        _, other, _ = gradprobe_run(model, rollouts, "grpo", "bnpo", chunk_size=chunk)
        assert_same_result(other, base)
        assert other.passes == 2 and other.micro_batch == units


@pytest.mark.parametrize("max_tokens", [1 << 14, 60, 12])
def test_hooks_equal_vmap_for_any_micro_batch(max_tokens):
    """Small micro-batches split tasks over several forward/backward passes: nothing is retained."""
    model = make_model("qwen2")
    rollouts = make_rollouts(seed=5)
    layout, vmapped, _ = gradprobe_run(model, rollouts, "grpo", "bnpo")
    _, hooked, _ = gradprobe_run(model, rollouts, "grpo", "bnpo", engine="hooks", max_tokens=max_tokens)
    assert hooked.engine == "hooks" and vmapped.engine == "vmap"
    assert_same_result(hooked, vmapped)
    batch, _ = build_units(assign_advantages(rollouts, ADVANTAGES.get("grpo")), LOSSES.get("bnpo"), MAX_NEW)
    plan = HookedEngine(model, [n for n, _ in model.named_parameters()]).plan(batch, layout.prompt_units(), max_tokens)
    if max_tokens < 100:
        per_task = [{i for i, mb in enumerate(plan) for p in mb if layout.prompt_task[p] == t}
                    for t in range(len(layout.tasks))]
        assert any(len(batches) > 1 for batches in per_task)
    else:
        assert len(plan) == 1


def test_one_pass_without_intervals_has_the_same_point_estimates():
    model = make_model("llama")
    rollouts = make_rollouts(seed=6)
    _, two, full = gradprobe_run(model, rollouts, "grpo", "grpo", engine="hooks")
    _, one, point = gradprobe_run(model, rollouts, "grpo", "grpo", engine="hooks", row_dots=False)
    assert one.passes == 1 and one.row_dots is None and two.passes == 2
    assert torch.equal(one.prompt_gram, two.prompt_gram) and torch.equal(one.sum_dots, two.sum_dots)
    for task, figures in point.tasks.items():
        assert figures["grad_sq_norm_unbiased_se"] is None and figures["grad_sq_norm_unbiased_ci"] == [None, None]
        assert figures["grad_sq_norm_unbiased"] == full.tasks[task]["grad_sq_norm_unbiased"]
        assert figures["grad_norm"] == full.tasks[task]["grad_norm"]


def test_host_resident_sums_give_the_same_result():
    """Sums in host memory take the device-to-host path (contributions formed, then moved)."""
    model = make_model("qwen2")
    rollouts = make_rollouts(seed=8)
    _, base, _ = gradprobe_run(model, rollouts, "grpo", "grpo", engine="hooks", max_tokens=30)
    _, hosted, _ = gradprobe_run(model, rollouts, "grpo", "grpo", engine="hooks", max_tokens=30, sums_device="cpu")
    assert_same_result(hosted, base)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_activation_checkpointing_gives_the_same_gradients(arch):
    """The plain-autograd, recomputed-activations path against float64 autograd."""
    model = make_model(arch)
    rollouts = make_rollouts(seed=7)
    layout, result, summary = gradprobe_run(model, rollouts, "grpo", "dapo", checkpoint=True)
    ref_grads, ref_prompt = reference(model, rollouts, "grpo", "dapo")
    ours = task_sums(result, model, len(layout.tasks))
    assert rel(ours, torch.stack([ref_grads[t] for t in layout.tasks])) < 1e-6
    assert rel(summary.prompt_grad_norm, [float(ref_prompt[k].norm()) for k in layout.prompt_keys]) < 1e-6
    # Every decoder layer is wrapped inside the block and unwrapped afterwards.
    from gradprobe.gradients.engine import checkpointed_layers

    with checkpointed_layers(model) as wrapped:
        assert wrapped == model.config.num_hidden_layers
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_sketched_row_sums_are_the_count_sketch_of_the_reference_vectors(engine):
    """--intervals sketch: r_p ~ <P u_p, P S_t> with P the count sketch of the saved task
    gradients; checked against P applied to float64 autograd's per-prompt vectors."""
    from gradprobe.gradients import projection
    from gradprobe.gradients.vmap_engine import GradientEngine as VmapEngine

    model = make_model("llama")  # tied: the head's and the embedding's uses both reach the sketch
    rollouts = make_rollouts(seed=12)
    scored = assign_advantages(rollouts, ADVANTAGES.get("grpo"))
    batch, layout = build_units(scored, LOSSES.get("grpo"), MAX_NEW)
    names = [n for n, _ in model.named_parameters()]
    if engine == "hooks":
        run = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64, sketch_dim=64)
        result = run.run(batch, layout.reductions(), max_tokens=40, row_dots=False)
    else:
        run = VmapEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64, sketch_dim=64)
        result = run.run(batch, layout.reductions(), chunk_size=4, row_dots=False)
    assert result.row_dots is None and result.sketch_dim == 64
    summary = summarise_gradients(result, layout)
    _, ref_prompt = reference(model, rollouts, "grpo", "grpo")
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    for task in layout.tasks:
        u = torch.stack([ref_prompt[key] for key in layout.prompt_keys if key[0] == task])
        named, start = {}, 0
        for name, shape in shapes:
            size = int(np.prod(shape))
            named[name] = u[:, start:start + size].reshape(len(u), *shape)
            start += size
        sketch = projection.count_sketch(named, 64, 0)
        expected = sketch @ sketch.sum(0)
        assert rel(summary.task_moments[task].row_sums, expected) < 1e-6


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ghost_and_direct_linear_norms_match_float64_autograd(arch):
    """Linear layers' per-unit norms by the ghost norm (token Grams, no per-unit gradient) and by
    building each unit's gradient: both against the reference; Qwen2's biases included, and the
    tied Llama head keeps the direct rule (its cross terms need the per-unit gradients)."""
    model = make_model(arch)
    rollouts = make_rollouts(seed=13)
    ref_grads, ref_prompt = reference(model, rollouts, "dr_grpo", "bnpo")
    from unittest import mock

    from gradprobe.gradients import hooked

    results = {}
    for choice in ("ghost", "direct"):
        with mock.patch.object(hooked, "linear_ghost_grams", wraps=hooked.linear_ghost_grams) as ghost:
            layout, result, summary = gradprobe_run(model, rollouts, "dr_grpo", "bnpo", engine="hooks",
                                                    max_tokens=50, linear_norms=choice)
        assert ghost.called == (choice == "ghost")
        assert rel(task_sums(result, model, len(layout.tasks)), torch.stack([ref_grads[t] for t in layout.tasks])) < 1e-6
        assert rel(summary.prompt_grad_norm, [float(ref_prompt[k].norm()) for k in layout.prompt_keys]) < 1e-6
        results[choice] = result
    assert_same_result(results["ghost"], results["direct"])
    from gradprobe.gradients.unit_rules import ghost_is_cheaper

    assert ghost_is_cheaper(8, 64, 64) and not ghost_is_cheaper(4096, 896, 896)
