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
from gradprobe.intervals import moments_from_gram
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


def exact(grams):
    """Exact task moments from each task's per-prompt Gram."""
    return {t: moments_from_gram(g) for t, g in grams.items()}


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
    return table, grams, us, compute_stats(table, exact(grams))


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


def _u_and_jackknife(u):
    """U-statistic and delete-one jackknife variance recomputed from the vectors."""
    def ustat(x):
        total = x.sum(0)
        return (total @ total - (x * x).sum()) / (len(x) * (len(x) - 1))

    loo = np.array([ustat(np.delete(u, p, 0)) for p in range(len(u))])
    return ustat(u), (len(u) - 1) / len(u) * ((loo - loo.mean()) ** 2).sum()


def test_dominance_matches_brute_force(mixed):
    """Ratios, Fieller bounds, z-test p-values and Holm from the u_p vectors in float64."""
    _, _, us, s = mixed
    dom = s["dominance"]
    fit = {t: _u_and_jackknife(u) for t, u in us.items()}
    assert dom["order"] == sorted(us, key=lambda t: -fit[t][0])
    z = sps.norm.ppf(0.975)
    ps = []
    for row, (a, b) in zip(dom["pairs"], combinations(dom["order"], 2)):
        (ua, va), (ub, vb) = fit[a], fit[b]
        assert (row["a"], row["b"]) == (a, b)
        assert row["ratio"] == pytest.approx(np.sqrt(ua / ub), rel=1e-10)
        grid = np.linspace(0, 3 * ua / ub, 300001)
        inside = grid[(ua - grid * ub) ** 2 <= z**2 * (va + grid**2 * vb)]
        assert row["squared_lo"] == pytest.approx(inside.min(), abs=2e-5 * ua / ub)
        assert row["squared_hi"] == pytest.approx(inside.max(), abs=2e-5 * ua / ub)
        ps.append(2 * sps.norm.sf(abs(ua - ub) / np.sqrt(va + vb)))
        assert row["p"] == pytest.approx(ps[-1], rel=1e-9)
        plain = np.linalg.norm(us[a].mean(0)) / np.linalg.norm(us[b].mean(0))
        assert row["plain_ratio"] == pytest.approx(plain, rel=1e-10)
    assert [r["p_holm"] for r in dom["pairs"]] == pytest.approx(holm(ps))
    for t, u in us.items():
        share = (u * u).sum(1).max() / (u * u).sum()
        assert dom["tasks"][t]["max_prompt_share"] == pytest.approx(share)
        assert dom["tasks"][t]["se"] == pytest.approx(np.sqrt(fit[t][1]), rel=1e-9)


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
    dom = s["dominance"]
    top, smallest = dom["order"][0], dom["order"][-1]
    row = next(r for r in dom["pairs"] if (r["a"], r["b"]) == (top, smallest))
    assert f"{top}'s unbiased gradient norm is {row['ratio']:.2f}x {smallest}'s" in text
    assert f"{row['lo']:.2f}-{row['hi']:.2f}" in text
    assert "inherent to the tasks" in text and "Kruskal-Wallis" in text
    assert "were degenerate" in text and "rises with |advantage|" in text


# ---------------------------------------------------------------- calibration (200 draws)


def _draws(n, **kw):
    rng = np.random.default_rng(2024)
    for _ in range(n):
        table, grams, _ = synth(rng, {"a": 25, "b": 25, "c": 25}, **kw)
        yield compute_stats(table, exact(grams))


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
    s = compute_stats(table, exact(grams))
    assert s["kruskal"]["H"] is None and s["kruskal"]["reason"]
    assert s["pairwise"] == []
    assert s["ols"]["F"] is None and "one task" in s["ols"]["task_reason"]
    assert s["ols"]["r2_covariates"] is not None
    assert s["dominance"]["order"] == ["math"] and s["dominance"]["pairs"] == []
    assert s["dominance"]["dominant"] is None and "fewer than 2" in s["dominance"]["reason"]
    assert any("Only one task (math)" in v for v in s["verdicts"])
    assert not any("inherent" in v for v in s["verdicts"])
    _json(s)


def test_two_tasks():
    table, grams, _ = synth(np.random.default_rng(2), {"a": 20, "b": 15}, effect={"b": 1.5})
    s = compute_stats(table, exact(grams))
    assert s["kruskal"]["df"] == 1 and len(s["pairwise"]) == 1
    assert s["pairwise"][0]["p_holm"] == pytest.approx(s["pairwise"][0]["p"])
    assert s["ols"]["df_num"] == 1
    assert s["dominance"]["top"] == "b" and len(s["dominance"]["pairs"]) == 1
    _json(s)


def test_tiny_samples_say_not_enough():
    table, grams, _ = synth(np.random.default_rng(3), {"a": 2, "b": 4, "c": 6}, effect={"c": 2})
    s = compute_stats(table, exact(grams))
    assert s["tasks_tested"] == ["b", "c"]
    assert s["spearman"]["within"]["a"]["mean_reward"]["rho"] is None
    assert "fewer than" in s["spearman"]["within"]["a"]["mean_reward"]["reason"]
    assert s["dominance"]["tasks"]["a"]["lo"] is None
    assert "fewer than 3 prompts" in s["dominance"]["tasks"]["a"]["reason"]
    pair_a = [r for r in s["dominance"]["pairs"] if "a" in (r["a"], r["b"])]
    assert pair_a and all(r["p"] is None and r["lo"] is None for r in pair_a)
    assert "a" in s["dominance"]["leading"] or s["dominance"]["top"] == "a"
    assert s["ols"]["F"] is None and s["ols"]["task_reason"]
    assert any("Not enough prompts to tell" in v for v in s["verdicts"])
    assert not any("inherent" in v for v in s["verdicts"])
    _json(s)


def test_ties_match_scipy():
    table, grams, _ = synth(np.random.default_rng(4), {"a": 30, "b": 30}, effect={"b": 0.7},
                            ties=True)
    assert len(np.unique(table.grad_norm)) < 15
    s = compute_stats(table, exact(grams))
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
    s = compute_stats(table, exact(grams))
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
    s = compute_stats(table, exact(grams))
    assert s["tasks_all_degenerate"] == ["dead"]
    assert s["n_excluded_degenerate"]["by_task"]["dead"] == 12
    assert "dead" not in s["tasks_tested"] and s["kruskal"]["df"] == 1
    assert "dead" not in s["dominance"]["order"]
    assert "all prompts degenerate" in s["dominance"]["tasks"]["dead"]["reason"]
    assert any("dead has no usable prompt" in v for v in s["verdicts"])
    _json(s)


def test_constant_and_collinear_covariates_dropped():
    table, grams, _ = synth(np.random.default_rng(8), {"a": 25, "b": 25}, effect={"b": 1.0})
    table = PromptTable(**{**table.__dict__, "prompt_length": np.full(50, 12.0),
                           "reward_std": 2 * table.mean_reward + 1})
    s = compute_stats(table, exact(grams))
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
    s = compute_stats(empty, {})
    assert s["verdicts"] == ["No prompts to analyse."]
    _json(s)
    table, grams, _ = synth(np.random.default_rng(9), {"a": 5, "b": 5})
    with pytest.raises(ValueError, match="task_moments"):
        compute_stats(table, exact({"a": grams["a"], "b": grams["b"][:4, :4]}))


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
    o = compute_stats(table, exact(grams))["ols"]
    assert o["dropped_collinear"] == ["mean_abs_advantage"]
    assert all(abs(c["beta"]) < 1e3 for c in o["coefficients"].values())


# ---------------------------------------------------------------- dominance verdict


def table_of(us, rng):
    """A PromptTable for per-prompt vectors {task: [m, d]}: ids 'task-i', random covariates."""
    task = [t for t, u in us.items() for _ in range(len(u))]
    n = len(task)
    norm = np.concatenate([np.linalg.norm(u, axis=1) for u in us.values()])
    reward = rng.uniform(0.1, 0.9, n)
    return PromptTable(task=task, grad_norm=norm, mean_reward=reward,
                       reward_std=np.sqrt(reward * (1 - reward)),
                       mean_abs_advantage=rng.uniform(0.2, 1.0, n),
                       mean_completion_length=rng.integers(20, 300, n).astype(float),
                       prompt_length=rng.integers(10, 80, n).astype(float),
                       degenerate=np.zeros(n, bool),
                       prompt_id=[f"{t}-{i}" for t, u in us.items() for i in range(len(u))])


def stats_of(us, rng):
    """compute_stats on the vectors, checking the verdict rule on every result: "dominates"
    only with every pair of the top task significant after Holm and its interval above 1."""
    s = compute_stats(table_of(us, rng), exact({t: u @ u.T for t, u in us.items()}))
    dom = s["dominance"]
    if "dominates" in " ".join(s["verdicts"]):
        assert dom["dominant"] == dom["top"]
        mine = [r for r in dom["pairs"] if r["a"] == dom["top"]]
        assert len(mine) == len(dom["order"]) - 1
        assert all(r["p_holm"] < 0.05 and r["lo"] > 1 for r in mine)
    return s


def prompt_pool(rng, n=64, d=32, outlier=False):
    """Per-prompt gradients of one distribution: a shared mean direction, log-normal sizes."""
    u = 0.6 + rng.standard_normal((n, d)) * rng.lognormal(0, 0.5, (n, 1))
    if outlier:  # one prompt 12x the median norm
        norms = np.linalg.norm(u, axis=1)
        u[0] *= 12 * np.median(norms) / norms[0]
    return u


@pytest.mark.parametrize("outlier", [False, True])
def test_null_relabellings_claim_differences_at_the_nominal_rate(outlier):
    """40 random relabellings of one pool into 4 fake tasks: no task truly differs."""
    rng = np.random.default_rng(11)
    pool = prompt_pool(rng, outlier=outlier)
    dominant, excluded, pairs, flagged = 0, 0, 0, 0
    for _ in range(40):
        perm = rng.permutation(len(pool))
        us = {f"t{k}": pool[perm[16 * k:16 * (k + 1)]] for k in range(4)}
        s = stats_of(us, rng)
        dom = s["dominance"]
        dominant += dom["dominant"] is not None
        assert ("dominates" in " ".join(s["verdicts"])) == (dom["dominant"] is not None)
        excluded += sum(r["lo"] > 1 or (r["hi"] is not None and r["hi"] < 1) for r in dom["pairs"])
        pairs += len(dom["pairs"])
        if outlier:
            holder = next(t for t in us if any(np.array_equal(v, pool[0]) for v in us[t]))
            flag = [f for f in dom["single_prompt"] if f["kind"] == "share"]
            flagged += any(f["task"] == holder and f["share"] > 0.5 for f in flag)
            assert any("rests on one prompt" in v and holder in v for v in s["verdicts"])
    assert dominant <= 4, dominant  # at most 10% of 40
    assert excluded / pairs <= 0.10, excluded / pairs
    if outlier:
        assert flagged == 40


def test_runner_up_within_3_percent_is_no_dominance():
    """The demo's case: count 2.2x solve, add within 3% of count: they lead together."""
    rng = np.random.default_rng(12)
    sizes = {"count": 1.0, "add": 0.97, "reverse": 0.7, "solve": 1 / 2.2}
    us = {t: c * (0.6 + rng.standard_normal((48, 32)) * 0.6 * rng.lognormal(0, 0.5, (48, 1)))
          for t, c in sizes.items()}
    s = stats_of(us, rng)
    dom = s["dominance"]
    text = " ".join(s["verdicts"])
    assert dom["dominant"] is None and "dominates" not in text
    assert set(dom["leading"]) == {"count", "add"} and dom["order"][-1] == "solve"
    assert "count and add lead together" in text or "add and count lead together" in text
    top_vs_add = next(r for r in dom["pairs"] if {r["a"], r["b"]} == {"count", "add"})
    assert top_vs_add["lo"] < 1 < top_vs_add["hi"]
    from gradprobe.pipeline import dominance_verdict
    tasks = {t: {"grad_norm": float(np.linalg.norm(u.mean(0))), "share": 0.25}
             for t, u in us.items()}
    headline = dominance_verdict(tasks, dom)
    assert "dominates" not in headline and "lead together" in headline


def test_a_clear_leader_dominates_and_the_headline_says_its_share():
    rng = np.random.default_rng(13)
    sizes = {"count": 2.0, "add": 1.0, "solve": 0.8}
    us = {t: c * (0.6 + rng.standard_normal((48, 32)) * 0.3) for t, c in sizes.items()}
    dom = stats_of(us, rng)["dominance"]
    assert dom["dominant"] == "count" and dom["leading"] == ["count"]
    assert all(r["p_holm"] < 0.05 for r in dom["pairs"] if r["a"] == "count")
    from gradprobe.pipeline import dominance_verdict
    tasks = {t: {"grad_norm": 1.0 + (t == "count"), "share": 0.6 if t == "count" else 0.2}
             for t in us}
    headline = dominance_verdict(tasks, dom)
    assert headline.startswith("count dominates: its unbiased gradient norm is")
    assert "60% of the mixed" in headline
    assert "add's, the next largest" in headline


def test_largest_not_significantly_and_untested_without_row_sums():
    rng = np.random.default_rng(14)
    us = {t: 0.3 + rng.standard_normal((12, 16)) for t in ("a", "b")}
    s = stats_of(us, rng)
    assert s["dominance"]["dominant"] is None
    assert "has the largest unbiased gradient norm, not significantly" in " ".join(s["verdicts"])
    from gradprobe.intervals import TaskMoments
    blind = {t: TaskMoments(float(u.sum(0) @ u.sum(0)), (u * u).sum(1), None, "none")
             for t, u in us.items()}
    dom = gs.dominance(blind)
    assert not dom["tested"] and dom["dominant"] is None
    assert all(r["lo"] is None and "no row sums" in r["reason"] for r in dom["pairs"])
    assert "untested (no row sums" in gs.dominance_sentence(dom)


def test_one_deletion_that_changes_the_leader_is_flagged():
    rng = np.random.default_rng(15)
    us = {t: mean + rng.standard_normal((10, 16)) * 0.2 for t, mean in (("a", 0.5), ("b", 0.56))}
    us["a"][3] = 3.0 * us["a"].mean(0)  # one prompt along the mean, three times its size
    s = stats_of(us, rng)
    dom = s["dominance"]
    flags = [f for f in dom["single_prompt"] if f["kind"] == "deletion"]
    assert dom["top"] == "a" and flags and flags[0]["prompt"] == "a-3"
    assert flags[0]["u_without"] < dom["tasks"]["b"]["value"]
    assert any("Without prompt a-3 of a, b would have the largest" in v for v in s["verdicts"])


def test_dominance_fits_the_scan_schema_in_every_row_sum_mode(mixed):
    """stats.dominance against scan.schema.json's $defs.dominance, exact, sketched and absent."""
    from jsonschema import Draft202012Validator

    from gradprobe import schema
    from gradprobe.intervals import TaskMoments

    definition = schema.load("scan")["$defs"]["dominance"]
    _, grams, us, s = mixed
    rng = np.random.default_rng(16)
    proj = rng.standard_normal((6, 4)) / 2.0
    sketched = {t: TaskMoments(g.sum(), np.diag(g), (u @ proj) @ (u @ proj).sum(0), "sketch", 4)
                for (t, g), u in zip(grams.items(), us.values())}
    blind = {t: TaskMoments(g.sum(), np.diag(g), None, "none") for t, g in grams.items()}
    for dom in (s["dominance"], gs.dominance(sketched), gs.dominance(blind)):
        Draft202012Validator(definition).validate(_json(dom))
    assert gs.dominance(sketched)["sketch_dims"] == [4]
