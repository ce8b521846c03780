"""Intervals from a task's streaming moments: the U-statistic's jackknife and norm-ratio tests.

Definitions: docs/metrics.md ("Task gradients", "Statistics against reward and advantage").
Task t has m prompts with per-prompt gradients u_1..u_m and S = sum_p u_p (g_t = S / m). Every
function here needs only the task's moments, which a one-pass gradient engine can provide:

    ||S||^2,   ||u_p||^2 (p = 1..m),   r_p = <u_p, S>  (exact, sketched, or absent).

The estimand is theta_t = ||E u||^2, the squared norm of the task's expected gradient (what
||g_t||^2 tends to with many prompts), estimated without bias by the U-statistic
    U = (||S||^2 - sum_p ||u_p||^2) / (m (m-1)).
Pairwise norm ratios are sqrt(theta_a / theta_b), tested and bounded through U_a and U_b (tasks
have disjoint prompts, so they are independent). All arithmetic is float64; the array functions
broadcast over leading axes (one row per task or per simulated replication).

Interval construction, and why (measured in tests/test_intervals.py):
- The delete-one jackknife of U needs only c_p = r_p - ||u_p||^2 = sum_{q != p} <u_p, u_q>:
      U_(-p) = (||S||^2 - sum_q ||u_q||^2 - 2 c_p) / ((m-1)(m-2)),
      Var_J = (m-1)/m sum_p (U_(-p) - mean U_(-.))^2 = 4 sum_p (c_p - mean c)^2 / (m (m-1) (m-2)^2).
  Writing U's Hoeffding decomposition with zeta_1 = mu' Sigma mu and delta the variance of the
  noise-times-noise term, Var U = 4 zeta_1/m + 2 delta/(m(m-1)) while
  E Var_J = 4 zeta_1/m + 4 delta/(m(m-2)): the jackknife overstates the noise part by
  2(m-1)/(m-2), so it errs on the wide side when the noise dominates.
- One task's interval U +- t_{m-1} SE: the jackknife variance has m-1 degrees of freedom like a
  sample variance, and at 8 prompts the normal quantile undercovers (about 92%).
- A ratio's interval inverts the test of theta_a = rho theta_b (Fieller):
      {rho >= 0 : (U_a - rho U_b)^2 <= q^2 (Var_a + rho^2 Var_b)},
  which stays valid when U_b is near 0 (the set is then unbounded) and covers 1 as often as it
  should when the tasks are alike; a log-ratio delta method breaks down there. With exact row
  sums q is the normal quantile: two tasks' variances add (Welch's degrees of freedom near
  2(m-1)) and the jackknife's upward bias above offsets the small-sample t correction. Over
  noise levels from signal-dominated to noise-dominated, Welch's t covered 95.6-98.6% and the
  normal quantile 94.3-97.0% at 8-64 prompts. The test of rho = 1 is
  T = (U_a - U_b) / sqrt(Var_a + Var_b), two-sided, on the same quantile.
- Sketched row sums r_p ~ <P u_p, P S> (P: k x d with independent N(0, 1/k) entries, or any
  projection with the same second and fourth moments) leave U exact but add noise to c_p. Its
  common mode (every r_p scaled by the same 1 + xi, as when P stretches S) is removed by
  calibrating to the exact total, r~_p = r^_p ||S||^2 / sum_q r^_q (sum_p r_p = ||S||^2). The
  rest has Cov(e_p, e_q) ~ (<u_p, u_q> ||S||^2 + r_p r_q) / k (Isserlis), whose expected share of
  the jackknife's sum of squares, tr C - 1'C1/m, is known from the moments alone,
      noise = (sum_p ||u_p||^2 ||S||^2 + sum_p r_p^2) / k - 2 ||S||^4 / (m k),
  with sum_p r_p^2 estimated from the sketched r_p (E r^_p^2 = r_p^2 + C_pp); it is subtracted.
  The subtracted part fluctuates with the k rows of P, so with f = noise / raw sum of squares it
  costs df_sketch = k ((1-f)/f)^2 degrees of freedom (Satterthwaite); a task's interval has
  1 / (1/(m-1) + 1/df_sketch), and a ratio's quantile is t at the Welch df of the df_sketch.
  Above f = MAX_SKETCH_NOISE_FRACTION no interval is claimed (the sketch is too small for these
  gradients: use exact row sums or a larger k). f is about (effective rank of the noise) / k.
  Known limit: the cross term between the row sums and the projection's noise has variance
  4 (c - mean c)' C (c - mean c), which needs the Gram and is not in the moments; measured, the
  corrected variance fluctuates more than the Satterthwaite model says (36x at 64 prompts in
  tests/test_intervals.py's design), so U's sketched intervals cover least, 93.3-96.5% there
  over 12,000 replications (ratios 94.3-96.7%). Counting that term in the degrees of freedom
  (with the true or a sketched Gram) overcorrects: 97-99.9% at 8-64 prompts.
- Without row sums (source "none") nothing is claimed: every interval is None with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

SOURCES = ("exact", "sketch", "none")
MIN_JACKKNIFE_PROMPTS = 3  # the delete-one U needs m - 1 >= 2 prompts
MAX_SKETCH_NOISE_FRACTION = 0.5  # above it the sketch's noise swamps the row sums' spread
U_METHOD = "delete-one-prompt jackknife of the U-statistic, t interval with m-1 df"
RATIO_METHOD = (
    "Fieller interval for theta_a/theta_b (theta = ||E u||^2, estimated by the U-statistic, "
    "delete-one-prompt jackknife variances, tasks independent), normal quantile; test of "
    "theta_a = theta_b by (U_a - U_b)/sqrt(Var_a + Var_b)"
)
SKETCH_NOTE = (
    "row sums from a random projection, calibrated to the exact ||S||^2; the projection's "
    "expected noise removed from the jackknife variance and charged as lost degrees of freedom"
)
NO_ROW_SUMS = "no row sums r_p (intervals off): no interval is claimed"


@dataclass(frozen=True)
class TaskMoments:
    """One task's streaming moments: ||S||^2, ||u_p||^2 and r_p = <u_p, S> (docs/metrics.md).

    `source` says how `row_sums` were obtained: "exact", "sketch" (r_p ~ <P u_p, P S> for a
    random projection P of dimension `sketch_dim`) or "none" (`row_sums` is None).
    """

    sum_sq_norm: float
    unit_sq_norms: np.ndarray
    row_sums: np.ndarray | None
    source: str
    sketch_dim: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {self.source!r}")
        units = np.asarray(self.unit_sq_norms, dtype=np.float64).reshape(-1)
        object.__setattr__(self, "unit_sq_norms", units)
        object.__setattr__(self, "sum_sq_norm", float(self.sum_sq_norm))
        if (self.row_sums is None) != (self.source == "none"):
            raise ValueError('row_sums must be None exactly when source is "none"')
        if self.row_sums is not None:
            rows = np.asarray(self.row_sums, dtype=np.float64).reshape(-1)
            if rows.shape != units.shape:
                raise ValueError("row_sums must have one entry per prompt, like unit_sq_norms")
            object.__setattr__(self, "row_sums", rows)
        if (self.source == "sketch") != (self.sketch_dim is not None):
            raise ValueError('sketch_dim is required for source "sketch" and only then')
        if self.sketch_dim is not None and self.sketch_dim < 1:
            raise ValueError("sketch_dim must be a positive integer")

    @property
    def n_prompts(self) -> int:
        return int(self.unit_sq_norms.size)


def moments_from_gram(gram: np.ndarray) -> TaskMoments:
    """Exact moments from a task's per-prompt Gram K[p, q] = <u_p, u_q>:
    ||S||^2 = sum K, ||u_p||^2 = K_pp, r_p = sum_q K_pq."""
    k = np.asarray(gram, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError("gram must be a square matrix")
    return TaskMoments(float(k.sum()), np.diag(k).copy(), k.sum(axis=1), "exact")


# ---------------------------------------------------------------- array functions


def u_statistic_values(sum_sq_norm: np.ndarray, unit_sq_norms: np.ndarray) -> np.ndarray:
    """U = (||S||^2 - sum_p ||u_p||^2) / (m (m-1)); NaN below 2 prompts (prompts: last axis)."""
    m = np.shape(unit_sq_norms)[-1]
    if m < 2:
        return np.full(np.shape(sum_sq_norm), np.nan)
    return (np.asarray(sum_sq_norm, np.float64) - np.sum(unit_sq_norms, axis=-1)) / (m * (m - 1))


def delete_one_u_statistics(sum_sq_norm: np.ndarray, unit_sq_norms: np.ndarray,
                            row_sums: np.ndarray) -> np.ndarray:
    """U_(-p) = (||S||^2 - sum_q ||u_q||^2 - 2 c_p) / ((m-1)(m-2)), c_p = r_p - ||u_p||^2.

    Equals the U-statistic of the m-1 prompts left when p is deleted (||S - u_p||^2 =
    ||S||^2 - 2 r_p + ||u_p||^2). Needs m >= 3.
    """
    units = np.asarray(unit_sq_norms, np.float64)
    m = units.shape[-1]
    total = np.asarray(sum_sq_norm, np.float64)[..., None] - units.sum(-1, keepdims=True)
    return (total - 2 * (np.asarray(row_sums, np.float64) - units)) / ((m - 1) * (m - 2))


def calibrated_row_sums(sum_sq_norm: np.ndarray, row_sums: np.ndarray) -> np.ndarray:
    """r~_p = r^_p ||S||^2 / sum_q r^_q: sketched row sums rescaled to their exact total."""
    rows = np.asarray(row_sums, np.float64)
    total = rows.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(total != 0, np.asarray(sum_sq_norm, np.float64)[..., None] / total, 1.0)
    return rows * scale


def sketch_noise_sum_of_squares(sum_sq_norm: np.ndarray, unit_sq_norms: np.ndarray,
                                row_sums: np.ndarray, sketch_dim: int) -> np.ndarray:
    """Expected part of sum_p (c_p - mean c)^2 due to sketched row sums (Gaussian-like P, dim k):

        E sum_p (e_p - mean e)^2 = tr C - 1'C1/m,  C_pq = (<u_p,u_q> ||S||^2 + r_p r_q) / k,
        tr C = (sum_p ||u_p||^2 ||S||^2 + sum_p r_p^2) / k,  1'C1 = 2 ||S||^4 / k,

    with sum_p r_p^2 = sum_p r^_p^2 - tr C (E r^_p^2 = r_p^2 + C_pp), so
    tr C = (sum_p ||u_p||^2 ||S||^2 + sum_p r^_p^2) / (k + 1).
    """
    sq = np.asarray(sum_sq_norm, np.float64)
    m = np.shape(unit_sq_norms)[-1]
    rows = np.asarray(row_sums, np.float64)
    trace = (np.sum(unit_sq_norms, -1) * sq + np.sum(rows * rows, -1)) / (sketch_dim + 1)
    return trace - 2 * sq * sq / (m * sketch_dim)


def jackknife_variance(sum_sq_norm: np.ndarray, unit_sq_norms: np.ndarray, row_sums: np.ndarray,
                       sketch_dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Var_J of U, f): Var_J = 4 (sum_p (c_p - mean c)^2 - noise) / (m (m-1) (m-2)^2).

    Sketched row sums are first `calibrated_row_sums`; noise is then
    `sketch_noise_sum_of_squares` (0 when exact) and f = noise / sum_p (c_p - mean c)^2 its
    share (0 when exact). Needs m >= 3.
    """
    units = np.asarray(unit_sq_norms, np.float64)
    m = units.shape[-1]
    rows = np.asarray(row_sums, np.float64)
    if sketch_dim is not None:
        rows = calibrated_row_sums(sum_sq_norm, rows)
    c = rows - units
    spread = np.sum((c - c.mean(-1, keepdims=True)) ** 2, -1)
    noise = np.zeros_like(spread)
    if sketch_dim is not None:
        noise = sketch_noise_sum_of_squares(sum_sq_norm, units, rows, sketch_dim)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(spread > 0, np.clip(noise / spread, 0.0, 1.0), 0.0)
    variance = 4 * np.maximum(spread - noise, 0.0) / (m * (m - 1) * (m - 2) ** 2)
    return variance, fraction


def sketch_degrees_of_freedom(sketch_dim: int | None, fraction: np.ndarray) -> np.ndarray:
    """Degrees of freedom the sketch correction costs: k ((1-f)/f)^2; infinite when exact.

    The subtracted noise fluctuates like a mean over the k rows of P: its variance relative to
    the variance estimate Var_J is about (f/(1-f))^2 / k.
    """
    f = np.asarray(fraction, np.float64)
    if sketch_dim is None:
        return np.full(f.shape, np.inf)
    with np.errstate(divide="ignore"):
        return np.where(f > 0, sketch_dim * ((1 - f) / np.maximum(f, 1e-300)) ** 2, np.inf)


def u_degrees_of_freedom(m: int, sketch_df: np.ndarray) -> np.ndarray:
    """Degrees of freedom of one task's variance: 1 / (1/(m-1) + 1/df_sketch) (m-1 when exact)."""
    with np.errstate(divide="ignore"):
        return 1.0 / (1.0 / (m - 1) + 1.0 / np.asarray(sketch_df, np.float64))


def welch_degrees_of_freedom(var_a: np.ndarray, df_a: np.ndarray, var_b: np.ndarray,
                             df_b: np.ndarray) -> np.ndarray:
    """Welch-Satterthwaite df of Var_a + Var_b: (Var_a + Var_b)^2 / (Var_a^2/df_a + Var_b^2/df_b);
    infinite when both df are (exact row sums) or both variances are 0."""
    va, vb = np.asarray(var_a, np.float64), np.asarray(var_b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = va**2 / np.asarray(df_a, np.float64) + vb**2 / np.asarray(df_b, np.float64)
        return np.where(den > 0, (va + vb) ** 2 / den, np.inf)


def normal_or_t_quantile(level: float, df: np.ndarray) -> np.ndarray:
    """Two-sided quantile: t_{df} at (1+level)/2, the normal one where df is infinite."""
    df = np.asarray(df, np.float64)
    p = (1 + level) / 2
    t = sps.t.ppf(p, np.where(np.isfinite(df), np.maximum(df, 1.0), 1.0))
    return np.where(np.isfinite(df), t, sps.norm.ppf(p))


def fieller_interval(num: np.ndarray, var_num: np.ndarray, den: np.ndarray, var_den: np.ndarray,
                     quantile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hull (lo, hi) of {rho >= 0 : (num - rho den)^2 <= q^2 (var_num + rho^2 var_den)}.

    The set solves A rho^2 + B rho + C <= 0 with A = den^2 - q^2 var_den, B = -2 num den,
    C = num^2 - q^2 var_num. A > 0: [root_1, root_2] (clipped at 0). A <= 0 (den not
    distinguishable from 0): unbounded, hi = inf, with lo the upper root when the lower one is
    negative (the set is [root, inf) on rho >= 0), else 0.
    """
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    q2 = np.asarray(quantile, np.float64) ** 2
    a = den * den - q2 * np.asarray(var_den, np.float64)
    b = -2 * num * den
    c = num * num - q2 * np.asarray(var_num, np.float64)
    disc = np.maximum(b * b - 4 * a * c, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = (-b - np.sqrt(disc)) / (2 * a)
        r2 = (-b + np.sqrt(disc)) / (2 * a)
    small, large = np.minimum(r1, r2), np.maximum(r1, r2)
    bounded = a > 0
    has_gap = ~bounded & (b * b - 4 * a * c > 0) & (a < 0)
    lo = np.where(bounded, np.maximum(small, 0.0),
                  np.where(has_gap & (small < 0), np.maximum(large, 0.0), 0.0))
    hi = np.where(bounded, np.maximum(large, 0.0), np.inf)
    return lo, hi


def squared_ratio_test(u_a: np.ndarray, var_a: np.ndarray, sketch_df_a: np.ndarray,
                       u_b: np.ndarray, var_b: np.ndarray, sketch_df_b: np.ndarray,
                       level: float = 0.95) -> tuple[np.ndarray, ...]:
    """(lo, hi, T, df, p) for theta_a / theta_b from U and jackknife variances of two tasks.

    lo, hi: `fieller_interval` with the quantile at the Welch df of (Var_a, rho^2 Var_b) over
    the sketch's degrees of freedom (infinite, so normal, with exact row sums), rho = U_a/U_b;
    T = (U_a - U_b) / sqrt(Var_a + Var_b) and its two-sided p on the Welch df of (Var_a, Var_b).
    """
    u_a, u_b = np.asarray(u_a, np.float64), np.asarray(u_b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(u_b > 0, np.maximum(u_a / u_b, 0.0), 1.0)
        df_ci = welch_degrees_of_freedom(var_a, sketch_df_a, rho**2 * var_b, sketch_df_b)
        lo, hi = fieller_interval(u_a, var_a, u_b, var_b, normal_or_t_quantile(level, df_ci))
        df = welch_degrees_of_freedom(var_a, sketch_df_a, var_b, sketch_df_b)
        t = (u_a - u_b) / np.sqrt(np.asarray(var_a) + np.asarray(var_b))
    finite = np.isfinite(df)
    p = 2 * np.where(finite, sps.t.sf(np.abs(t), np.where(finite, df, 1.0)), sps.norm.sf(np.abs(t)))
    return lo, hi, t, df, p


# ---------------------------------------------------------------- one task


@dataclass(frozen=True)
class UStatisticInterval:
    """U with its jackknife SE and t interval; None fields carry `reason` (docs/metrics.md).

    `df` is the interval's degrees of freedom, `sketch_df` the part the sketch costs (None when
    exact), `sketch_noise_fraction` f, `delete_one` the U_(-p) values (None without row sums).
    """

    value: float | None
    se: float | None
    lo: float | None
    hi: float | None
    df: float | None
    level: float
    n_prompts: int
    source: str
    sketch_dim: int | None
    sketch_noise_fraction: float | None
    sketch_df: float | None
    reason: str | None
    method: str = U_METHOD
    delete_one: np.ndarray | None = field(default=None, repr=False)

    @property
    def variance(self) -> float | None:
        return None if self.se is None else self.se**2

    def as_dict(self) -> dict[str, Any]:
        """The JSON fields (no delete-one values)."""
        keys = ("value", "se", "lo", "hi", "df", "level", "n_prompts", "source", "sketch_dim",
                "sketch_noise_fraction", "sketch_df", "reason", "method")
        return {k: _finite(getattr(self, k)) for k in keys}


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def u_statistic_interval(moments: TaskMoments, level: float = 0.95) -> UStatisticInterval:
    """U-statistic of ||E u||^2 with its delete-one jackknife SE and a t interval:

        U +- t_{df, (1+level)/2} sqrt(Var_J),  df = 1 / (1/(m-1) + 1/df_sketch)

    (df = m-1 with exact row sums; `sketch_degrees_of_freedom` otherwise). `delete_one` holds
    the U_(-p) (from the calibrated row sums when sketched: approximate).
    """
    m = moments.n_prompts
    value = None
    if m >= 2:
        value = float(u_statistic_values(moments.sum_sq_norm, moments.unit_sq_norms))
    empty = dict(value=value, se=None, lo=None, hi=None, df=None, level=level, n_prompts=m,
                 source=moments.source, sketch_dim=moments.sketch_dim,
                 sketch_noise_fraction=None, sketch_df=None)
    if moments.row_sums is None:
        return UStatisticInterval(**empty, reason=NO_ROW_SUMS)
    if m < MIN_JACKKNIFE_PROMPTS:
        return UStatisticInterval(**empty, reason=f"fewer than {MIN_JACKKNIFE_PROMPTS} prompts")
    args = (moments.sum_sq_norm, moments.unit_sq_norms, moments.row_sums)
    variance, fraction = (float(x) for x in jackknife_variance(*args, moments.sketch_dim))
    sketched = moments.source == "sketch"
    rows = calibrated_row_sums(moments.sum_sq_norm, moments.row_sums) if sketched else args[2]
    loo = delete_one_u_statistics(moments.sum_sq_norm, moments.unit_sq_norms, rows)
    sketch_df = float(sketch_degrees_of_freedom(moments.sketch_dim, fraction))
    empty |= {"sketch_noise_fraction": fraction if sketched else None,
              "sketch_df": _finite(sketch_df) if sketched else None}
    if sketched and fraction > MAX_SKETCH_NOISE_FRACTION:
        why = (f"the sketch (k={moments.sketch_dim}) is too small for these gradients: its noise "
               f"is {fraction:.0%} of the row sums' spread; use exact row sums or a larger sketch")
        return UStatisticInterval(**empty, reason=why, delete_one=loo)
    df = float(u_degrees_of_freedom(m, sketch_df))
    half = float(normal_or_t_quantile(level, df)) * math.sqrt(variance)
    method = f"{U_METHOD}; {SKETCH_NOTE}" if sketched else U_METHOD
    return UStatisticInterval(**(empty | {"se": math.sqrt(variance), "lo": value - half,
                                          "hi": value + half, "df": df}),
                              reason=None, method=method, delete_one=loo)


# ---------------------------------------------------------------- two tasks


def ratio_test(a: UStatisticInterval, b: UStatisticInterval, level: float = 0.95) -> dict[str, Any]:
    """Test and interval of theta_a / theta_b (theta = ||E u||^2) from two tasks' U intervals.

    squared_ratio = U_a / U_b and ratio = sqrt(U_a / U_b) (None unless both U > 0);
    squared_lo/hi: `fieller_interval` at the normal quantile (t at the Welch df of the sketch's
    degrees of freedom when sketched), lo/hi their square roots (hi None when unbounded);
    statistic T = (U_a - U_b) / sqrt(Var_a + Var_b), p = 2 P(|Z| > |T|) (t at that df when
    sketched). Both None with a `reason` when either task has no interval.
    """
    out: dict[str, Any] = {"squared_ratio": None, "ratio": None, "squared_lo": None,
                           "squared_hi": None, "lo": None, "hi": None, "statistic": None,
                           "df": None, "p": None, "level": level, "reason": None}
    if a.value is not None and b.value is not None and a.value > 0 and b.value > 0:
        out["squared_ratio"] = a.value / b.value
        out["ratio"] = math.sqrt(a.value / b.value)
    missing = [x for x in (a, b) if x.se is None]
    if missing:
        out["reason"] = missing[0].reason
        return out
    if a.variance + b.variance <= 0:
        out["reason"] = "both tasks' U-statistics have zero variance"
        return out
    df_a, df_b = (math.inf if x.sketch_df is None else x.sketch_df for x in (a, b))
    lo, hi, t, df, p = (float(x) for x in squared_ratio_test(
        a.value, a.variance, df_a, b.value, b.variance, df_b, level))
    out |= {"squared_lo": lo, "squared_hi": _finite(hi), "lo": math.sqrt(lo),
            "hi": _finite(math.sqrt(hi)), "statistic": t, "df": _finite(df), "p": p}
    if not math.isfinite(hi):
        out["reason"] = "unbounded above: the smaller task's U is not distinguishable from 0"
    return out
