"""gradprobe.stats against scipy/numpy recomputed from the rows, calibration, edge cases, views."""

from __future__ import annotations

import io
import json
from itertools import combinations

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as sps

from gradprobe import stats as gs
from gradprobe.stats import COVARIATES, PromptTable, compute_stats, holm
from gradprobe.views.stats_view import render_stats, stats_markdown


def synth(rng, sizes, effect=None, adv_coef=0.0, adv_shift=None, noise=0.5, deg_frac=0.0,
          d=6, ties=False):
    """A PromptTable, Grams and u_p vectors: log||u_p|| = effect_t + adv_coef |A| + noise."""
    cols = {c: [] for c in ("grad_norm", *COVARIATES, "degenerate")}
    task, grams, us = [], {}, {}
    for t, m in sizes.items():
        reward = rng.uniform(0.05, 0.95, m)
        adv = rng.uniform(0.2, 1.0, m) + (adv_shift or {}).get(t, 0.0)
        norm = np.exp((effect or {}).get(t, 0.0) + adv_coef * adv + rng.normal(0, noise, m))
        if ties:
            norm = np.round(norm, 0) + 1.0
        deg = rng.random(m) < deg_frac
        norm[deg], reward[deg], adv[deg] = 0.0, rng.integers(0, 2, deg.sum()), 0.0
        dirs = rng.normal(size=(m, d)) + 1.0
        u = dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * norm[:, None]
        task += [t] * m
        us[t], grams[t] = u, u @ u.T
        for c, v in (("grad_norm", norm), ("mean_reward", reward),
                     ("reward_std", np.sqrt(reward * (1 - reward))), ("mean_abs_advantage", adv),
                     ("mean_completion_length", rng.integers(20, 300, m).astype(float)),
                     ("prompt_length", rng.integers(10, 80, m).astype(float)),
                     ("degenerate", deg)):
            cols[c].append(v)
    table = PromptTable(task=task, **{c: np.concatenate(v) for c, v in cols.items()})
    return table, grams, us


def usable(table):
    return ~table.degenerate & (table.grad_norm > 0)


def groups(table, tasks):
    task, ok = np.asarray(table.task), usable(table)
    return {t: table.grad_norm[ok & (task == t)] for t in tasks}


@pytest.fixture(scope="module")
def mixed():
    rng = np.random.default_rng(7)
    table, grams, us = synth(rng, {"math": 40, "code": 35, "count": 30},
                             effect={"code": 1.0, "count": 0.4}, adv_coef=0.8, deg_frac=0.15)
    return table, grams, us, compute_stats(table, grams, n_bootstrap=300, seed=3)


# ---------------------------------------------------------------- against scipy / numpy


def test_holm_hand_case():
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.02]) == pytest.approx([0.02])


def test_counts(mixed):
    table, _, _, s = mixed
    task = np.asarray(table.task)
    for t in s["tasks"]:
        assert s["n_prompts"]["by_task"][t] == (task == t).sum()
        assert s["n_excluded_degenerate"]["by_task"][t] == (table.degenerate & (task == t)).sum()
    assert s["n_excluded_degenerate"]["total"] == table.degenerate.sum()
    assert s["n_usable"]["total"] == usable(table).sum()


def test_kruskal_matches_scipy(mixed):
    table, _, _, s = mixed
    g = groups(table, s["tasks"])
    ref = sps.kruskal(*g.values())
    n = sum(v.size for v in g.values())
    kw = s["kruskal"]
    assert kw["H"] == pytest.approx(ref.statistic) and kw["p"] == pytest.approx(ref.pvalue)
    assert kw["epsilon_squared"] == pytest.approx(ref.statistic / (n - 1))
    assert (kw["n"], kw["df"]) == (n, 2)


def test_pairwise_matches_scipy(mixed):
    table, _, _, s = mixed
    g = groups(table, s["tasks"])
    refs = [sps.mannwhitneyu(g[a], g[b], alternative="two-sided") for a, b in combinations(g, 2)]
    adj = holm([r.pvalue for r in refs])
    for row, (a, b), r, ph in zip(s["pairwise"], combinations(g, 2), refs, adj):
        assert (row["a"], row["b"]) == (a, b)
        assert row["U"] == pytest.approx(r.statistic) and row["p"] == pytest.approx(r.pvalue)
        assert row["p_holm"] == pytest.approx(ph)
        assert row["effect"] == pytest.approx(2 * r.statistic / (g[a].size * g[b].size) - 1)


def _fisher(rho, n, alpha=0.05):
    half = sps.norm.ppf(1 - alpha / 2) * 1.06 / np.sqrt(n - 3)
    return np.tanh(np.arctanh(rho) - half), np.tanh(np.arctanh(rho) + half)


def test_spearman_matches_scipy(mixed):
    table, _, _, s = mixed
    task, ok = np.asarray(table.task), usable(table)
    scopes = [("pooled", ok, s["spearman"]["pooled"])]
    scopes += [(t, ok & (task == t), s["spearman"]["within"][t]) for t in s["tasks"]]
    for _, sel, res in scopes:
        for c in COVARIATES:
            ref = sps.spearmanr(table.grad_norm[sel], getattr(table, c)[sel])
            r = res[c]
            assert r["rho"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
            assert (r["lo"], r["hi"]) == pytest.approx(_fisher(ref.statistic, sel.sum()))
            assert r["n"] == sel.sum()


def _ols_reference(table, tasks, covs):
    """RSS of both models, R^2 of the task-only model, F and p, from numpy lstsq."""
    task, ok = np.asarray(table.task), usable(table)
    sel = ok & np.isin(task, tasks)
    y = np.log(table.grad_norm[sel])
    x_r = np.column_stack([np.ones(sel.sum())] + [getattr(table, c)[sel] for c in covs])
    dums = [(task[sel] == t).astype(float) for t in tasks[1:]]
    x_f = np.column_stack([x_r, *dums])
    x_t = np.column_stack([np.ones(sel.sum()), *dums])

    def rss(x):
        beta = np.linalg.lstsq(x, y, rcond=None)[0]
        return ((y - x @ beta) ** 2).sum(), beta

    (rr, beta), (rf, _), (rt, _) = rss(x_r), rss(x_f), rss(x_t)
    tss, n, q = ((y - y.mean()) ** 2).sum(), y.size, len(dums)
    f = ((rr - rf) / q) / (rf / (n - x_f.shape[1]))
    se = np.sqrt(rr / (n - x_r.shape[1]) * np.diag(np.linalg.inv(x_r.T @ x_r)))
    return dict(r2_covariates=1 - rr / tss, r2_with_task=1 - rf / tss, r2_task_only=1 - rt / tss,
                partial_r2_task=(rr - rf) / rr, F=f, p=sps.f.sf(f, q, n - x_f.shape[1]),
                df_num=q, df_den=n - x_f.shape[1], n=n), beta, se


def test_ols_matches_lstsq(mixed):
    table, _, _, s = mixed
    ref, beta, se = _ols_reference(table, s["tasks"], COVARIATES)
    o = s["ols"]
    for k, v in ref.items():
        assert o[k] == pytest.approx(v, rel=1e-9), k
    for i, c in enumerate(COVARIATES, start=1):
        assert o["coefficients"][c]["beta"] == pytest.approx(beta[i])
        assert o["coefficients"][c]["t"] == pytest.approx(beta[i] / se[i])


def test_bootstrap_ratio_matches_u_vectors(mixed):
    table, _, us, s = mixed
    rc = s["ratio_ci"]
    rng = np.random.default_rng(3)  # the documented scheme: one integers() draw per task, in order
    reps = {}
    for t, u in us.items():
        idx = rng.integers(0, len(u), size=(300, len(u)))
        reps[t] = np.linalg.norm(u[idx].mean(axis=1), axis=1)
    norms = {t: np.linalg.norm(u.mean(0)) for t, u in us.items()}
    ref = min(norms, key=norms.get)
    assert rc["reference"] == ref
    for t in us:
        lo, hi = np.quantile(reps[t] / reps[ref], [0.025, 0.975])
        row = rc["tasks"][t]
        assert row["norm"] == pytest.approx(norms[t])
        assert row["ratio"] == pytest.approx(norms[t] / norms[ref])
        assert (row["lo"], row["hi"]) == pytest.approx((lo, hi), rel=1e-9)
    r = np.array(list(reps.values()))
    mom = rc["max_over_min"]
    assert mom["ratio"] == pytest.approx(max(norms.values()) / min(norms.values()))
    assert (mom["lo"], mom["hi"]) == pytest.approx(
        tuple(np.quantile(r.max(0) / r.min(0), [0.025, 0.975])), rel=1e-9)


def test_reward_bins_match_numpy(mixed):
    table, _, _, s = mixed
    task, ok, r = np.asarray(table.task), usable(table), table.mean_reward
    edges = np.linspace(r.min(), r.max(), gs.N_REWARD_BINS + 1)
    assert s["reward_bins"]["edges"] == pytest.approx(edges)
    for t, bins in s["reward_bins"]["by_task"].items():
        for b, row in enumerate(bins):
            last = b == len(bins) - 1
            inbin = (r >= edges[b]) & ((r <= edges[b + 1]) if last else (r < edges[b + 1]))
            vals = table.grad_norm[inbin & ok & (task == t)]
            assert row["n"] == vals.size
            assert row["n_degenerate"] == (inbin & ~ok & (task == t)).sum()
            if vals.size:
                assert row["mean_norm"] == pytest.approx(vals.mean())


def test_verdicts_inherent_case(mixed):
    *_, s = mixed
    text = " ".join(s["verdicts"])
    top = s["ratio_ci"]["max_over_min"]["max_task"]
    row = s["ratio_ci"]["tasks"][top]
    assert f"{top}'s gradient is {row['ratio']:.1f}x" in text
    assert f"{row['lo']:.1f}-{row['hi']:.1f}" in text
    assert "inherent to the tasks" in text and "Kruskal-Wallis" in text
    assert "were degenerate" in text and "rises with |advantage|" in text


# ---------------------------------------------------------------- calibration (200 draws)


def _draws(n, **kw):
    rng = np.random.default_rng(2024)
    for _ in range(n):
        table, grams, _ = synth(rng, {"a": 25, "b": 25, "c": 25}, **kw)
        yield compute_stats(table, grams, n_bootstrap=20)


def test_null_task_f_test_rejects_at_nominal_rate():
    runs = list(_draws(200, adv_coef=0.5))
    k = sum(s["ols"]["p"] < 0.05 for s in runs)
    lo, hi = sps.binom.ppf([0.005, 0.995], 200, 0.05)
    assert lo <= k <= hi, k


def test_planted_task_effect_is_found():
    runs = list(_draws(200, effect={"b": 1.0, "c": -0.5}, adv_coef=0.5))
    assert np.mean([s["ols"]["p"] < 0.05 for s in runs]) > 0.95
    assert np.mean(["inherent to the tasks" in " ".join(s["verdicts"]) for s in runs]) > 0.9


def test_advantage_driven_norms_are_not_called_inherent():
    # tasks differ only through |A|: a raw imbalance that |advantage| explains
    runs = list(_draws(200, adv_coef=3.0, adv_shift={"b": 0.6, "c": 1.2}, noise=0.3))
    assert np.mean([s["kruskal"]["p"] < 0.05 for s in runs]) > 0.95
    k = sum(s["ols"]["p"] < 0.05 for s in runs)
    assert k <= sps.binom.ppf(0.995, 200, 0.05)
    assert np.mean([s["ols"]["partial_r2_task"] for s in runs]) < gs.SMALL_PARTIAL_R2
    assert min(s["ols"]["r2_covariates"] for s in runs) > gs.EXPLAINED_R2
    texts = [" ".join(s["verdicts"]) for s in runs]
    assert not any("inherent" in t for t in texts)
    assert np.mean(["explained by |advantage|" in t for t in texts]) > 0.9


# ---------------------------------------------------------------- edge cases


def _json(s):
    return json.loads(json.dumps(s, allow_nan=False))


def test_one_task():
    table, grams, _ = synth(np.random.default_rng(1), {"math": 30}, adv_coef=1.0)
    s = compute_stats(table, grams, n_bootstrap=50)
    assert s["kruskal"]["H"] is None and s["kruskal"]["reason"]
    assert s["pairwise"] == []
    assert s["ols"]["F"] is None and "one task" in s["ols"]["task_reason"]
    assert s["ols"]["r2_covariates"] is not None
    assert s["ratio_ci"]["tasks"]["math"]["ratio"] == 1.0
    assert s["ratio_ci"]["max_over_min"]["ratio"] is None
    assert any("Only one task (math)" in v for v in s["verdicts"])
    assert not any("inherent" in v for v in s["verdicts"])
    _json(s)


def test_two_tasks():
    table, grams, _ = synth(np.random.default_rng(2), {"a": 20, "b": 15}, effect={"b": 1.5})
    s = compute_stats(table, grams, n_bootstrap=50)
    assert s["kruskal"]["df"] == 1 and len(s["pairwise"]) == 1
    assert s["pairwise"][0]["p_holm"] == pytest.approx(s["pairwise"][0]["p"])
    assert s["ols"]["df_num"] == 1
    assert s["ratio_ci"]["max_over_min"]["max_task"] == "b"
    _json(s)


def test_tiny_samples_say_not_enough():
    table, grams, _ = synth(np.random.default_rng(3), {"a": 2, "b": 4, "c": 6}, effect={"c": 2})
    s = compute_stats(table, grams, n_bootstrap=50)
    assert s["tasks_tested"] == ["b", "c"]
    assert s["spearman"]["within"]["a"]["mean_reward"]["rho"] is None
    assert "fewer than" in s["spearman"]["within"]["a"]["mean_reward"]["reason"]
    assert s["ratio_ci"]["tasks"]["a"]["lo"] is None
    assert "fewer than" in s["ratio_ci"]["tasks"]["a"]["reason"]
    assert s["ols"]["F"] is None and s["ols"]["task_reason"]
    assert any("Not enough prompts to tell" in v for v in s["verdicts"])
    assert not any("inherent" in v for v in s["verdicts"])
    _json(s)


def test_ties_match_scipy():
    table, grams, _ = synth(np.random.default_rng(4), {"a": 30, "b": 30}, effect={"b": 0.7},
                            ties=True)
    assert len(np.unique(table.grad_norm)) < 15
    s = compute_stats(table, grams, n_bootstrap=50)
    g = groups(table, ["a", "b"])
    assert s["kruskal"]["H"] == pytest.approx(sps.kruskal(*g.values()).statistic)
    ref = sps.mannwhitneyu(g["a"], g["b"], alternative="two-sided")
    assert s["pairwise"][0]["p"] == pytest.approx(ref.pvalue)
    ok = usable(table)
    rho = sps.spearmanr(table.grad_norm[ok], table.mean_abs_advantage[ok]).statistic
    assert s["spearman"]["pooled"]["mean_abs_advantage"]["rho"] == pytest.approx(rho)


def test_all_tied_norms():
    table, grams, _ = synth(np.random.default_rng(5), {"a": 10, "b": 10})
    table = PromptTable(**{**table.__dict__, "grad_norm": np.ones(20)})
    s = compute_stats(table, grams, n_bootstrap=20)
    assert s["kruskal"]["H"] is None and "tied" in s["kruskal"]["reason"]
    assert s["pairwise"][0]["p"] is None and s["pairwise"][0]["p_holm"] is None
    assert s["spearman"]["pooled"]["mean_reward"]["rho"] is None
    assert s["ols"]["r2_covariates"] is None
    _json(s)


def test_all_degenerate_task():
    table, grams, _ = synth(np.random.default_rng(6), {"a": 20, "b": 20, "dead": 12},
                            effect={"b": 1.0})
    deg = np.asarray(table.task) == "dead"
    table = PromptTable(**{**table.__dict__, "degenerate": table.degenerate | deg,
                           "grad_norm": np.where(deg, 0.0, table.grad_norm)})
    grams["dead"] = np.zeros((12, 12))
    s = compute_stats(table, grams, n_bootstrap=50)
    assert s["tasks_all_degenerate"] == ["dead"]
    assert s["n_excluded_degenerate"]["by_task"]["dead"] == 12
    assert "dead" not in s["tasks_tested"] and s["kruskal"]["df"] == 1
    assert s["ratio_ci"]["tasks"]["dead"]["ratio"] is None
    assert s["ratio_ci"]["reference"] != "dead"
    assert any("dead has no usable prompt" in v for v in s["verdicts"])
    _json(s)


def test_constant_and_collinear_covariates_dropped():
    table, grams, _ = synth(np.random.default_rng(8), {"a": 25, "b": 25}, effect={"b": 1.0})
    table = PromptTable(**{**table.__dict__, "prompt_length": np.full(50, 12.0),
                           "reward_std": 2 * table.mean_reward + 1})
    s = compute_stats(table, grams, n_bootstrap=20)
    o = s["ols"]
    assert o["dropped_constant"] == ["prompt_length"] and o["dropped_collinear"] == ["reward_std"]
    keep = ["mean_reward", "mean_abs_advantage", "mean_completion_length"]
    assert o["covariates"] == keep
    ref, _, _ = _ols_reference(table, ["a", "b"], keep)
    assert o["F"] == pytest.approx(ref["F"]) and o["r2_covariates"] == pytest.approx(
        ref["r2_covariates"])
    assert s["spearman"]["pooled"]["prompt_length"]["reason"] == "constant input"
    _json(s)


def test_empty_table_and_bad_input():
    empty = PromptTable([], *[np.zeros(0)] * 6, np.zeros(0, bool))
    s = compute_stats(empty, {}, n_bootstrap=10)
    assert s["verdicts"] == ["No prompts to analyse."]
    _json(s)
    table, grams, _ = synth(np.random.default_rng(9), {"a": 5, "b": 5})
    with pytest.raises(ValueError, match="task_gram"):
        compute_stats(table, {"a": grams["a"], "b": grams["b"][:4, :4]})


def test_format_p():
    assert gs.format_p(1e-9) == "p<1e-6"
    assert gs.format_p(0.0123) == "p=0.012"
    assert gs.format_p(3.2e-4) == "p=3.2e-04"


def test_json_and_views(mixed):
    *_, s = mixed
    assert _json(s) == s
    console = Console(file=io.StringIO(), width=160)
    for part in render_stats(s):
        console.print(part)
    text = console.file.getvalue()
    md = stats_markdown(s)
    assert "Kruskal-Wallis" in text and "Kruskal-Wallis" in md
    for v in s["verdicts"]:
        assert v in md
    assert "| H | df | p |" in md


def test_nearly_collinear_covariate_dropped():
    """GRPO with binary rewards: mean |A| = c * reward_std up to the estimator's epsilon."""
    table, grams, _ = synth(np.random.default_rng(9), {"a": 25, "b": 25}, effect={"b": 1.0})
    std = table.reward_std
    near = 2 * std / (std + 1e-4) * std  # what std-normalised advantages give, eps included
    table = PromptTable(**{**table.__dict__, "mean_abs_advantage": near})
    o = compute_stats(table, grams, n_bootstrap=20)["ols"]
    assert o["dropped_collinear"] == ["mean_abs_advantage"]
    assert all(abs(c["beta"]) < 1e3 for c in o["coefficients"].values())
