"""The hooked engine against the vmap engine and float64 autograd, beyond the shared tests in
test_gradients_exact: parameter subsets, the per-module rules, failures and the fallback."""

from __future__ import annotations

import pytest
import torch

from gradprobe.advantages import ADVANTAGES
from gradprobe.gradients import unit_rules
from gradprobe.gradients.engine import EngineOutOfMemory, NonFiniteGradientError
from gradprobe.gradients.vmap_engine import GradientEngine
from gradprobe.gradients.hooked import HookedEngine, UnsupportedModel
from gradprobe.gradients.layout import build_units
from gradprobe.gradients.params import select_parameters
from gradprobe.gradients.stage import EngineUnavailable, StageSettings, run_gradient_stage
from gradprobe.objective import LOSSES
from gradprobe.scoring import assign_advantages
from test_gradients_exact import (
    MAX_NEW,
    TEMPERATURE,
    assert_same_result,
    make_model,
    make_rollouts,
    out_of_memory_above,
)


def units_of(seed: int = 2):
    scored = assign_advantages(make_rollouts(seed=seed), ADVANTAGES.get("grpo"))
    return build_units(scored, LOSSES.get("dapo"), MAX_NEW)


def both_engines(model, names, batch, layout, max_tokens=1 << 14):
    hooked = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64)
    vmapped = GradientEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64)
    return (hooked.run(batch, layout.reductions(), max_tokens=max_tokens),
            vmapped.run(batch, layout.reductions(), chunk_size=4))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("params", [["last-block"], ["attention"], ["mlp"], ["*embed_tokens*"],
                                    ["*norm*"], ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"]])
def test_parameter_subsets(arch, params):
    """Backward stops at the first selected module; a tied embedding still gets the head's use."""
    model = make_model(arch)
    try:
        names = select_parameters(model, params)
    except Exception:
        pytest.skip(f"{arch} has no {params}")  # lm_head.weight is the embedding in tied llama
    batch, layout = units_of()
    hooked, vmapped = both_engines(model, names, batch, layout, max_tokens=40)
    assert hooked.param_names == vmapped.param_names and hooked.groups == vmapped.groups
    assert_same_result(hooked, vmapped)


def test_generic_rule_for_an_unregistered_norm(monkeypatch):
    """A leaf module without a rule goes through torch.func per row, exactly."""
    model = make_model("llama")
    for name in ("LlamaRMSNorm",):
        monkeypatch.delitem(unit_rules.UNIT_RULES, name)
    norm = model.model.norm
    assert unit_rules.rule_for(norm) is unit_rules.generic_rule
    batch, layout = units_of(seed=6)
    hooked, vmapped = both_engines(model, [n for n, _ in model.named_parameters()], batch, layout)
    assert_same_result(hooked, vmapped)


def test_rms_norm_rule_equals_the_generic_rule():
    torch.manual_seed(0)
    model = make_model("qwen2")
    norm = model.model.layers[0].input_layernorm
    x, g = torch.randn(5, 7, 16, dtype=torch.float64), torch.randn(5, 7, 16, dtype=torch.float64)
    units = unit_rules.MicroBatchUnits(torch.tensor([0, 0, 1, 2, 2]), [(0, 2), (2, 3), (3, 5)])
    fast = unit_rules.rms_norm_rule(norm, ["weight"], x, g, units, torch.float64)["weight"].values
    slow = unit_rules.generic_rule(norm, ["weight"], x, g, units, torch.float64)["weight"].values
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-14)
    # and against autograd on each unit's rows
    for u, (start, end) in enumerate(units.unit_rows):
        weight = norm.weight.detach().clone().requires_grad_(True)
        xs = x[start:end].float()
        y = weight * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).double()
        (grad,) = torch.autograd.grad((y * g[start:end]).sum(), weight)
        assert torch.allclose(fast[u], grad, rtol=1e-10)


def test_linear_rule_paths_agree(monkeypatch):
    """Per-row batched matmul (small layers) and one matmul per unit (large) give the same."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4).double()
    x, g = torch.randn(5, 3, 6, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    units = unit_rules.MicroBatchUnits(torch.tensor([0, 1, 1, 1, 2]), [(0, 1), (1, 4), (4, 5)])
    small = unit_rules.linear_rule(layer, ["weight", "bias"], x, g, units, torch.float64)
    monkeypatch.setattr(unit_rules, "PER_ROW_LIMIT_BYTES", 0)
    large = unit_rules.linear_rule(layer, ["weight", "bias"], x, g, units, torch.float64)
    for name in ("weight", "bias"):
        assert torch.allclose(small[name].values, large[name].values, rtol=1e-12)
    expected = torch.einsum("rto,rti->oi", g[1:4], x[1:4])
    assert torch.allclose(large["weight"].values[1], expected, rtol=1e-12)


def test_sparse_embedding_rows_meet_dense_and_sparse_parts():
    """Prompt products and sums over row-sparse (embedding) and dense parts, against dense algebra."""
    torch.manual_seed(0)
    shape = (6, 3)
    dense = unit_rules.PerUnit(torch.randn(4, *shape, dtype=torch.float64))
    a = unit_rules.PerUnit(torch.randn(4, 3, 3, dtype=torch.float64), torch.tensor([0, 2, 5]))
    b = unit_rules.PerUnit(torch.randn(4, 2, 3, dtype=torch.float64), torch.tensor([2, 4]))
    for left, right in [(a, b), (a, dense), (dense, b), (a, a)]:
        full = left.dense(shape).flatten(1) @ right.dense(shape).flatten(1).T
        expected = torch.stack([full[0:2, 0:2], full[2:4, 2:4]])  # two prompts of two units
        assert torch.allclose(unit_rules.prompt_products(left, right, 2), expected)
    kept = unit_rules.restricted(dense, torch.tensor([2, 4]))
    assert torch.allclose(kept.dense(shape)[:, [2, 4]], dense.values[:, [2, 4]])
    assert kept.dense(shape)[:, [0, 1, 3, 5]].abs().max() == 0
    total = torch.zeros((1, *shape), dtype=torch.float64)
    unit_rules.add_weighted(total, torch.tensor([[1.0, 2.0, 0.0, 0.0]], dtype=torch.float64), a)
    assert torch.allclose(total[0], a.dense(shape)[0] + 2 * a.dense(shape)[1])


def test_non_finite_gradients_name_their_units():
    model = make_model("llama")
    batch, layout = units_of()
    first_task_unit = next(u for u in range(len(batch.units)) if batch.units[u])
    batch.coefficients[batch.units[first_task_unit][0]][-1] = float("nan")
    engine = HookedEngine(model, [n for n, _ in model.named_parameters()], TEMPERATURE)
    with pytest.raises(NonFiniteGradientError) as error:
        engine.run(batch, layout.reductions())
    assert first_task_unit in error.value.units
    assert all(layout.prompt_task[layout.unit_prompt[u]] == 0 for u in error.value.units)


def test_out_of_memory_halves_the_micro_batch(monkeypatch):
    model = make_model("llama")
    batch, layout = units_of(seed=4)
    names = [n for n, _ in model.named_parameters()]
    engine = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64)
    reference = engine.run(batch, layout.reductions(), max_tokens=1 << 14)
    monkeypatch.setattr(engine, "_forward_backward", out_of_memory_above(engine._forward_backward, 3))
    retries = []
    result = engine.run_adaptive(batch, layout.reductions(), 1 << 14, on_retry=retries.append)
    assert retries and retries == sorted(retries, reverse=True)
    assert_same_result(result, reference)
    monkeypatch.setattr(engine, "_forward_backward", out_of_memory_above(engine._forward_backward, 0))
    with pytest.raises(EngineOutOfMemory):
        engine.run_adaptive(batch, layout.reductions(), 64)


def test_unsupported_module_falls_back_to_vmap():
    """A parameter held by a module with children (no single call describes it)."""
    model = make_model("llama")
    layer = model.model.layers[0]
    layer.register_parameter("extra", torch.nn.Parameter(torch.ones(3, dtype=torch.float64)))
    names = ["model.layers.0.extra", "model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(UnsupportedModel, match="submodules"):
        HookedEngine(model, names)
    batch, layout = units_of()
    result, reason = run_gradient_stage(model, names, batch, layout,
                                        StageSettings(temperature=TEMPERATURE), 1 << 30)
    assert result.engine == "vmap" and "submodules" in reason
    assert result.sum_of(0)["model.layers.0.extra"].abs().max() == 0  # unused in forward
    assert result.sum_of(0)["model.layers.0.mlp.down_proj.weight"].abs().max() > 0
    with pytest.raises(EngineUnavailable):
        run_gradient_stage(model, names, batch, layout, StageSettings(engine="hooks"), 1 << 30)


def test_a_module_called_twice_is_refused():
    """One module reused in two places (its saved input would be overwritten): vmap handles it."""
    model = make_model("llama")
    layers = model.model.layers
    layers[1].input_layernorm = layers[0].input_layernorm
    batch, layout = units_of()
    engine = HookedEngine(model, ["model.layers.0.input_layernorm.weight"], TEMPERATURE)
    with pytest.raises(UnsupportedModel, match="twice"):
        engine.run(batch, layout.reductions())
    result, reason = run_gradient_stage(model, ["model.layers.0.input_layernorm.weight"], batch, layout,
                                        StageSettings(temperature=TEMPERATURE), 1 << 30)
    assert result.engine == "vmap" and "twice" in reason


def test_all_groups_degenerate_give_zero_gradients():
    model = make_model("llama")
    rollouts = make_rollouts(seed=2)
    for r in rollouts:
        r.reward = 1.0
    batch, layout = build_units(assign_advantages(rollouts, ADVANTAGES.get("grpo")), LOSSES.get("grpo"), MAX_NEW)
    names = [n for n, _ in model.named_parameters()]
    result, reason = run_gradient_stage(model, names, batch, layout, StageSettings(temperature=TEMPERATURE), 1 << 30)
    assert result.engine == "hooks" and reason is None
    assert result.prompt_gram.abs().max() == 0 and result.sum_dots.abs().max() == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_padding_token_inside_a_sequence_adds_no_embedding_gradient(arch):
    """A generated token equal to the embedding's padding_idx (a pad-as-EOS tokenizer, or TRL's
    sampling) gets no embedding-row gradient, as in nn.Embedding's backward."""
    from dataclasses import replace

    model = make_model(arch)
    assert model.get_input_embeddings().padding_idx == 0
    rollouts = [replace(r, completion_token_ids=[0, *r.completion_token_ids])
                for r in assign_advantages(make_rollouts(seed=4), ADVANTAGES.get("grpo"))]
    batch, layout = build_units(rollouts, LOSSES.get("dapo"), MAX_NEW + 1)
    names = [n for n, _ in model.named_parameters()]
    hooked, vmapped = both_engines(model, names, batch, layout)
    assert_same_result(hooked, vmapped)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_row_dot_rules_equal_inner_products_of_per_unit_gradients(arch, monkeypatch):
    """Pass 2 by the linear and embedding row-dot rules (no per-unit gradient built) gives the
    row dots of the per-unit path, tied head and embedding (llama) and biases (qwen2) included."""
    model = make_model(arch)
    names = [n for n, _ in model.named_parameters()]
    batch, layout = units_of(seed=7)
    ran = []
    for module_type, rule in list(unit_rules.ROW_DOT_RULES.items()):
        def spy(*args, rule=rule, module_type=module_type):
            ran.append(module_type)
            return rule(*args)
        monkeypatch.setitem(unit_rules.ROW_DOT_RULES, module_type, spy)
    by_rules = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64).run(
        batch, layout.reductions(), max_tokens=40)
    assert set(ran) == {torch.nn.Linear, torch.nn.Embedding}
    ran.clear()
    per_unit = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64, row_dot_rules=False).run(
        batch, layout.reductions(), max_tokens=40)
    assert not ran and per_unit.row_dots.abs().max() > 0
    assert_same_result(by_rules, per_unit)


@pytest.mark.parametrize("arch,generic_norms", [("llama", False), ("qwen2", False), ("llama", True)])
def test_checkpointed_activations_give_the_same_result(arch, generic_norms, monkeypatch):
    """With decoder layers checkpointed, the hooks take each module's input from the
    recomputation (also when its output gradient arrives first) and equal the plain run, row dots
    and the generic torch.func rule (norms inside the layers) included."""
    model = make_model(arch)
    if generic_norms:
        monkeypatch.delitem(unit_rules.UNIT_RULES, "LlamaRMSNorm")
    names = [n for n, _ in model.named_parameters()]
    batch, layout = units_of(seed=9)
    plain = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64).run(
        batch, layout.reductions(), max_tokens=40)
    recomputed = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        recomputed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    checkpointed = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64,
                                checkpoint_activations=True).run(batch, layout.reductions(), max_tokens=40)
    assert recomputed, "no layer was checkpointed"
    assert_same_result(checkpointed, plain)


def test_buffer_pool_lends_the_first_fitting_buffer_of_several_sizes():
    """Buffers of one key but different lengths: a request is served from the first that fits
    (found by position; comparing tensors with == would be elementwise and fail)."""
    from gradprobe.gradients.hooked import _BufferPool

    pool = _BufferPool()
    small = pool.allocate((15, 4, 3), torch.float32, torch.device("cpu"))
    large = pool.allocate((16, 4, 3), torch.float32, torch.device("cpu"))
    pool.give_back(small)
    pool.give_back(large)
    lent = pool.allocate((16, 4, 3), torch.float32, torch.device("cpu"))
    assert lent.data_ptr() == large.data_ptr() and lent.shape == (16, 4, 3)
    again = pool.allocate((8, 4, 3), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == small.data_ptr() and again.shape == (8, 4, 3)
