"""The estimators of docs/metrics.md on synthetic per-prompt vectors, and the engine's invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradprobe.advantages import ADVANTAGES
from gradprobe.gradients import estimators as est
from gradprobe.gradients.engine import EngineOutOfMemory
from gradprobe.gradients.vmap_engine import GradientEngine
from gradprobe.gradients.layout import build_units
from gradprobe.objective import LOSSES
from gradprobe.scoring import assign_advantages
from test_gradients_exact import gradprobe_run, make_model, make_rollouts, out_of_memory_above


def moments_of(vectors: np.ndarray) -> tuple[float, torch.Tensor, torch.Tensor]:
    """What the streaming engine knows of m per-prompt vectors: ||S||^2, ||u_p||^2, <u_p, S>."""
    u = torch.as_tensor(vectors, dtype=torch.float64)
    total = u.sum(0)
    return float(total @ total), (u * u).sum(1), u @ total


def draw(rng, m: int, mean: np.ndarray, scale: float) -> np.ndarray:
    return mean + scale * rng.standard_normal((m, mean.size))


def test_u_statistic_is_unbiased_where_the_naive_norm_is_not():
    rng = np.random.default_rng(0)
    d, m, scale, draws = 20, 6, 1.0, 4000
    mean = np.full(d, 0.3)
    truth = float(mean @ mean)  # ||E u||^2 = 1.8; tr(Sigma) = d * scale^2 = 20
    u_values, naive = [], []
    for _ in range(draws):
        vectors = draw(rng, m, mean, scale)
        u_values.append(est.u_statistic(*moments_of(vectors)[:2]))
        naive.append(float(vectors.mean(0) @ vectors.mean(0)))
    u_values = np.array(u_values)
    standard_error = u_values.std(ddof=1) / np.sqrt(draws)
    assert abs(u_values.mean() - truth) < 3 * standard_error
    bias = np.mean(naive) - truth
    assert bias == pytest.approx(d * scale**2 / m, rel=0.1)  # tr(Sigma)/m


def test_jackknife_matches_brute_force_leave_one_out():
    rng = np.random.default_rng(1)
    vectors = draw(rng, 7, np.ones(5), 2.0)
    loo = np.array([est.u_statistic(*moments_of(np.delete(vectors, i, 0))[:2]) for i in range(7)])
    variance = 6 / 7 * ((loo - loo.mean()) ** 2).sum()
    se, centre = est.u_statistic_jackknife(*moments_of(vectors))
    assert se == pytest.approx(np.sqrt(variance), rel=1e-10)
    assert centre == pytest.approx(loo.mean(), rel=1e-10)


def test_jackknife_interval_covers_the_truth_at_about_its_nominal_rate():
    rng = np.random.default_rng(2)
    d, m, draws = 10, 40, 200
    mean = np.full(d, 0.5)
    truth = float(mean @ mean)
    covered = 0
    for _ in range(draws):
        moments = moments_of(draw(rng, m, mean, 1.0))
        value = est.u_statistic(*moments[:2])
        se, _ = est.u_statistic_jackknife(*moments)
        covered += value - est.Z_95 * se <= truth <= value + est.Z_95 * se
    assert 0.90 * draws <= covered <= 0.99 * draws


def test_noise_trace_and_scale_match_the_sample_covariance():
    rng = np.random.default_rng(3)
    vectors = draw(rng, 9, np.full(4, 2.0), 0.5)
    sum_sq, unit_sq, _ = moments_of(vectors)
    trace = np.trace(np.cov(vectors.T, ddof=1))
    assert est.noise_trace(sum_sq, unit_sq) == pytest.approx(trace, rel=1e-10)
    assert est.noise_scale(sum_sq, unit_sq) == pytest.approx(trace / est.u_statistic(sum_sq, unit_sq), rel=1e-10)


def test_corrected_cosine_and_shares_by_hand():
    assert est.corrected_cosine(1.0, 4.0, 1.0) == pytest.approx(0.5)
    assert np.isnan(est.corrected_cosine(1.0, -1.0, 1.0))
    dots = torch.tensor([[4.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    # g = (g1 + g2)/2: g.g = (4 + 2 + 1)/4 = 1.75; share1 = .5 * (4 + 1)/2 / 1.75
    shares = est.update_shares(dots, weights)
    assert shares.tolist() == pytest.approx([1.25 / 1.75, 0.5 / 1.75])
    assert est.norm_ratios(torch.tensor([2.0, 0.0, 1.0])).tolist() == [2.0, 0.0, 1.0]


def test_sign_parts_sum_to_the_task_gradient_and_modules_to_the_total():
    model = make_model("llama")
    rollouts = make_rollouts(seed=11)
    layout, result, summary = gradprobe_run(model, rollouts, "grpo", "grpo")
    for task in layout.tasks:
        by_module = sum(group["tasks"][task]["grad_sq_norm"] for group in summary.modules.values())
        assert by_module == pytest.approx(summary.tasks[task]["grad_sq_norm"], rel=1e-9)
        t = summary.tasks[task]
        if t["pos_neg_cosine"] is not None:
            rebuilt = (t["pos_grad_norm"] ** 2 + t["neg_grad_norm"] ** 2
                       + 2 * t["pos_neg_cosine"] * t["pos_grad_norm"] * t["neg_grad_norm"])
            assert rebuilt == pytest.approx(t["grad_sq_norm"], rel=1e-9)
        # each prompt's squared norm is its sign parts plus twice their cross term
        moments = summary.task_moments[task]
        mine = np.flatnonzero(layout.prompt_task == layout.tasks.index(task))
        gram = result.total_prompt_gram()[mine]
        assert torch.allclose(gram[:, 0, 0] + gram[:, 1, 1] + 2 * gram[:, 0, 1], torch.as_tensor(moments.unit_sq_norms))
        assert torch.allclose(gram[:, 0, 1], gram[:, 1, 0])


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result(monkeypatch):
    model = make_model("llama")
    rollouts = make_rollouts(seed=4)
    layout, reference, _ = gradprobe_run(model, rollouts, "grpo", "grpo", chunk_size=16)
    batch, _ = build_units(assign_advantages(rollouts, ADVANTAGES.get("grpo")), LOSSES.get("grpo"), 7)
    engine = GradientEngine(model, [n for n, _ in model.named_parameters()], 0.7,
                            accumulate_dtype=torch.float64)
    monkeypatch.setattr(engine, "unit_gradients", out_of_memory_above(engine.unit_gradients, 2))
    retries = []
    result = engine.run_adaptive(batch, layout.reductions(), 16, on_retry=retries.append)
    assert retries == [8, 4, 2] and result.micro_batch == 2
    assert torch.allclose(result.prompt_gram, reference.prompt_gram, rtol=1e-10, atol=1e-14)
    assert torch.allclose(result.row_dots, reference.row_dots, rtol=1e-10, atol=1e-14)

    monkeypatch.setattr(engine, "unit_gradients", out_of_memory_above(engine.unit_gradients, 0))
    with pytest.raises(EngineOutOfMemory):
        engine.run_adaptive(batch, layout.reductions(), 4)
