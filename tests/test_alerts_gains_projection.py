"""Pure functions behind report/compare/gains: the --fail-on language, windowed gains, Spearman
with few tasks, and the older Gaussian projection's determinism and cosine error bound (the count
sketch scans save now: test_count_sketch.py)."""

from __future__ import annotations

import math

import pytest
import torch

from gradprobe import alerts, gains, task_grads
from gradprobe.compare import spearman
from gradprobe.errors import UserInputError
from gradprobe.gradients import projection

DOC = {
    "tasks": {
        "math": {"share": 0.2, "norm_ratio": 1.0, "grad_norm": 1.0, "degenerate_fraction": 0.6},
        "code": {"share": 0.8, "norm_ratio": 9.0, "grad_norm": 9.0, "degenerate_fraction": 0.1},
    },
    "cosine": {"tasks": ["math", "code"], "matrix": [[1.0, -0.3], [-0.3, 1.0]]},
    "cosine_unbiased": {"tasks": ["math", "code"], "matrix": [[None, None], [None, None]]},
    "mixed": {"grad_norm": 5.0},
}


def check(*expressions: str) -> list[dict]:
    return alerts.run_checks(list(expressions), alerts.SCAN_METRICS, DOC, list(DOC["tasks"]))


def test_issue_examples_fire():
    fired = [c["fired"] for c in check("max_norm_ratio>8", "min_cosine<-0.2", "share[code]>0.6",
                                       "degenerate_fraction[math]>0.5")]
    assert fired == [True, True, True, True]
    assert [c["fired"] for c in check("max_norm_ratio>9", "min_cosine<-0.3", "share[math]>0.6")] == [False] * 3


def test_every_operator():
    results = {op: check(f"share[code]{op}0.8")[0]["fired"] for op in alerts.OPERATORS}
    assert results == {">": False, ">=": True, "<": False, "<=": True, "==": True, "!=": False}


def test_star_and_undefined_values():
    checks = check("share[*]>0.1")
    assert [c["index"] for c in checks] == ["math", "code"] and all(c["fired"] for c in checks)
    undefined = check("min_cosine_unbiased<0")[0]
    assert undefined["value"] is None and not undefined["fired"] and "undefined" in undefined["message"]
    assert check("min_cosine[math]<-0.2")[0]["fired"]
    assert check(" share [ code ] >= 0.8 ")[0]["fired"]


@pytest.mark.parametrize("expression, fragment", [
    ("share[code]", "not an expression"), ("share[code]=>1", "not an expression"),
    ("share[code]>nan", "not a number"), ("bogus>1", "valid names"), ("share[python]>1", "tasks: math, code"),
])
def test_bad_expressions(expression, fragment):
    with pytest.raises(UserInputError, match=re_escape(fragment)):
        check(expression)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_registries_list_signatures():
    assert {"max_norm_ratio", "min_cosine", "max_share", "share[TASK]", "norm_ratio[TASK]", "grad_norm[TASK]",
            "mean_reward[TASK]", "degenerate_fraction[TASK]"} <= set(alerts.SCAN_METRICS.signatures())
    assert {"min_drift_cosine", "gain[TASK]", "drift_cosine[TASK]"} <= set(alerts.COMPARE_METRICS.signatures())


def test_windowed_gain_formula():
    # R(s) is the mean of the step's rows; gain(s) = mean R(s+1..s+w) - mean R(s-w..s-1)
    rows = [(0, "t", 0.0), (0, "t", 1.0), (1, "t", 1.0), (2, "t", 5.0), (3, "t", 2.0), (4, "t", 4.0)]
    at = gains.windowed_gain(gains.step_means(rows)["t"], 2, 2)
    assert at["before_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert at["after_mean"] == pytest.approx(3.0)
    assert at["gain"] == pytest.approx(3.0 - 0.75)
    document = gains.log_gains(rows, 2)
    assert document["step"] == 2 and document["tasks"]["t"]["gain"] == pytest.approx(2.25)
    assert [p["step"] for p in document["tasks"]["t"]["series"]] == [1, 2, 3]
    with pytest.raises(UserInputError, match="--window"):
        gains.log_gains(rows, 0)


def test_scan_gains_use_shared_prompts():
    def doc(rewards):
        return {"tasks": {"t": {"mean_reward": sum(rewards.values()) / len(rewards)}},
                "prompts": [{"task": "t", "prompt_id": p, "mean_reward": r, "n_rollouts": 4}
                            for p, r in rewards.items()]}
    out = gains.scan_gains(doc({"p1": 0.0, "p2": 0.5}), doc({"p2": 1.0, "p3": 0.0}))["t"]
    assert out["gain"] == pytest.approx(0.5) and out["n_prompts_compared"] == 1 and out["gain_note"]


def test_spearman_is_honest_about_few_tasks():
    three = spearman([1, 2, 3], [1, 2, 3])
    assert three["rho"] == 1 and three["p"] == pytest.approx(1 / 3) and "only 3 tasks" in three["note"]
    four = spearman([1, 2, 3, 4], [1, 2, 3, 4])
    assert four["p"] == pytest.approx(2 / 24) and "cannot show" in four["note"]
    assert spearman([1, 2], [2, 1])["rho"] is None
    assert spearman([1, 1, 1], [1, 2, 3])["rho"] is None
    many = spearman(list(range(12)), list(range(12)))
    assert many["p"] < 1e-6 and many["note"] is None


def _vectors(seed: int, cos: float, n: int = 3000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    z -= (z @ x) / (x @ x) * x
    y = cos * x / x.norm() + math.sqrt(1 - cos**2) * z / z.norm()
    stacked = torch.stack([x, y]).float()
    return {"layer.weight": stacked[:, :2000].reshape(2, 40, 50), "layer.bias": stacked[:, 2000:]}


def test_projection_is_deterministic_and_order_free():
    v = _vectors(0, 0.5)
    first = projection.gaussian_projection(v, 1024, seed=3)
    again = projection.gaussian_projection(dict(reversed(list(v.items()))), 1024, seed=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, projection.gaussian_projection(v, 1024, seed=4))


@pytest.mark.parametrize("cos", [0.0, 0.6, -0.9])
def test_projected_cosine_error_bound(cos):
    dim, n = projection.MIN_DIM, 40
    bound = projection.cosine_error_bound(dim)
    errors, covered = [], 0
    for seed in range(n):
        p = projection.gaussian_projection(_vectors(seed, cos), dim, seed)
        estimate = projection.cosine(p[0], p[1])
        errors.append(abs(estimate - cos))
        lo, hi = projection.cosine_interval(estimate, dim)
        covered += lo <= cos <= hi
    assert sum(e <= bound for e in errors) >= 0.85 * n  # a 95% bound, with slack for 40 draws
    assert max(errors) <= 2 * bound
    assert covered >= 0.85 * n
    # the error shrinks like (1 - c^2) / sqrt(k)
    rms = math.sqrt(sum(e * e for e in errors) / n)
    assert rms <= 1.5 * (1 - cos**2) / math.sqrt(dim) + 1e-3


def test_task_grads_exact_below_limit_projected_above(tmp_path):
    sums = {"w": torch.randn(2, 300, 10), "b": torch.randn(2, 10)}
    small = task_grads.from_sums(sums, ["a", "b"], limit_mb=1.0)
    assert small.kind == "exact"
    big = task_grads.from_sums(sums, ["a", "b"], limit_mb=0.01, seed=5)
    assert big.kind == "projected" and big.dim >= 1024 and big.seed == 5
    assert big.projection == "countsketch" and "--task-grads-limit" in big.reason
    assert torch.allclose(big.tensors["projection"].double(), projection.count_sketch(sums, big.dim, 5))
    task_grads.write(tmp_path / "g.safetensors", big)
    back = task_grads.read(tmp_path / "g.safetensors")
    assert (back.kind, back.dim, back.seed, back.tasks, back.params, back.projection) == (
        "projected", big.dim, 5, ["a", "b"], big.params, "countsketch")
    assert torch.equal(back.tensors["projection"], big.tensors["projection"])
    with pytest.raises(UserInputError, match="not comparable"):
        task_grads.check_comparable(small, big)
    drift = task_grads.drift(small, small)
    assert drift["kind"] == "exact" and drift["tasks"]["a"]["cosine"] == pytest.approx(1.0)
