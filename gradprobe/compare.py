"""`gradprobe compare`: two scans of the same tasks (A before, B after), or a scan and a log.

Per task: the learning gain, the change of grad_norm, norm_ratio and share, the gain per unit
squared gradient gain_t / ||g_t||^2 (A's gradient), the drift cos(g_t under A, g_t under B), and
across tasks the Spearman correlation of A's grad_sq_norm (and share) with the gain
(docs/metrics.md, "Learning gains"). With few tasks the rank test has little power, and the document
says so in numbers: the smallest p-value any ranking of n tasks can reach.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

import gradprobe
from gradprobe import artifacts, gains, task_grads
from gradprobe.errors import UserInputError

SHORT_WINDOW = 5  # log windows of fewer steps make each mean reward, and so the gain, noisy
FEW_TASKS = 5  # below this many tasks no ranking reaches p < 0.05 (2/n! > 0.05 for n <= 4)
EXACT_PERMUTATION_MAX = 8


def spearman(x: list[float], y: list[float]) -> dict[str, Any]:
    """Spearman rho of x and y (scipy.stats.spearmanr) with a two-sided p-value: exact by
    enumerating all n! rankings for n <= 8, else scipy's t approximation; and a note on power.

    The smallest two-sided p-value any ranking of n distinct values can reach is 2/n!; below
    n = 5 that exceeds 0.05, so the test cannot show a relation at all.
    """
    from scipy.stats import rankdata, spearmanr

    n = len(x)
    out: dict[str, Any] = {"rho": None, "p": None, "n": n, "p_method": None, "note": None}
    if n < 3:
        out["note"] = f"{n} task(s): a rank correlation needs at least 3"
        return out
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "one of the two is the same for every task: no ranking to correlate"
        return out
    rho = float(spearmanr(x, y).statistic)
    out["rho"] = rho
    if n <= EXACT_PERMUTATION_MAX:
        rx, ry = rankdata(x), rankdata(y)
        rx, ry = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean()), (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())
        permuted = rx[np.array(list(itertools.permutations(range(n))))]
        out["p"] = float(np.mean(np.abs(permuted @ ry) >= abs(rho) - 1e-12))
        out["p_method"] = "exact permutation"
    else:
        out["p"], out["p_method"] = float(spearmanr(x, y).pvalue), "t approximation"
    if n < FEW_TASKS:
        out["note"] = (f"only {n} tasks: the smallest p-value any ranking can reach is "
                       f"{2 / math.factorial(n):.3g}, so this test cannot show a relation; read rho "
                       "as a description, not as evidence")
    elif n < 10:
        out["note"] = f"{n} tasks: the test has little power; only a strong relation can be significant"
    return out


def _change(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(b) - float(a)


def _check_same_tasks(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> None:
    ta, tb = list(a["tasks"]), list(b["tasks"])
    if set(ta) != set(tb):
        raise UserInputError(
            f"scans of different tasks: {a_name} has {', '.join(ta)}; {b_name} has {', '.join(tb)}; "
            "compare needs two scans of the same mix"
        )


def compare_documents(a: dict[str, Any], b: dict[str, Any] | None, drift: dict[str, Any] | None,
                      log: dict[str, Any] | None, a_name: str = "A", b_name: str = "B",
                      drift_reason: str | None = None) -> dict[str, Any]:
    """The compare document from scan A, optional scan B, drift and log gains (plain data in/out)."""
    if b is not None:
        _check_same_tasks(a, b, a_name, b_name)
    if b is None and log is None:
        raise UserInputError("compare needs a second scan B or a training log (--log)")
    scan_gain = gains.scan_gains(a, b) if b is not None else {}
    notes: list[str] = []
    if log is not None:
        missing = [t for t in a["tasks"] if t not in log["tasks"]]
        if missing:
            raise UserInputError(f"the training log has no rows for task(s) {', '.join(missing)} of "
                                 f"{a_name}; log tasks: {', '.join(log['tasks'])}")
    gain_source = "scans" if b is not None else "log"
    tasks: dict[str, dict[str, Any]] = {}
    for name, ta in a["tasks"].items():
        tb = b["tasks"][name] if b is not None else {}
        row: dict[str, Any] = {"grad_norm_a": ta["grad_norm"], "grad_sq_norm_a": ta["grad_sq_norm"],
                               "norm_ratio_a": ta["norm_ratio"], "share_a": ta["share"],
                               "mean_reward_a": ta["mean_reward"]}
        if b is not None:
            row.update(scan_gain[name])
            row.update(grad_norm_b=tb["grad_norm"], grad_sq_norm_b=tb["grad_sq_norm"],
                       norm_ratio_b=tb["norm_ratio"], share_b=tb["share"],
                       grad_norm_change=_change(ta["grad_norm"], tb["grad_norm"]),
                       norm_ratio_change=_change(ta["norm_ratio"], tb["norm_ratio"]),
                       share_change=_change(ta["share"], tb["share"]))
        if log is not None:
            row["log_gain"] = log["tasks"][name]["gain"]
            if b is None:
                row["gain"] = row["log_gain"]
        sq = ta["grad_sq_norm"]
        row["gain_per_sq_norm"] = (row["gain"] / sq if row.get("gain") is not None and sq else None)
        drift_row = (drift or {}).get("tasks", {}).get(name)
        row["drift_cosine"] = drift_row["cosine"] if drift_row else None
        if drift_row and "ci" in drift_row:
            row["drift_cosine_ci"] = drift_row["ci"]
        tasks[name] = row
    relation = []
    for source, key in (("scans", "gain"), ("log", "log_gain")):
        if (source == "scans" and b is None) or (source == "log" and log is None):
            continue
        usable = [t for t, r in tasks.items() if r.get(key) is not None]
        gain_values = [float(tasks[t][key]) for t in usable]
        for against in ("grad_sq_norm", "share"):
            pairs = [(float(a["tasks"][t][against]), g) for t, g in zip(usable, gain_values)
                     if a["tasks"][t][against] is not None]
            result = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            relation.append({"gain": source, "against": against, **result})
    warnings = setting_warnings(a, b, a_name, b_name) + window_warnings(log)
    if relation and relation[0]["note"]:
        notes.append(relation[0]["note"])
    if drift is None and drift_reason:
        notes.append(drift_reason)
    return {
        "schema_version": artifacts.SCHEMA_VERSION,
        "kind": "compare",
        "gradprobe_version": gradprobe.__version__,
        "a": _identity(a, a_name),
        "b": None if b is None else _identity(b, b_name),
        "log": None if log is None else {k: log[k] for k in ("source", "window", "step", "formula")},
        "gain_source": gain_source,
        "gain_formula": ("mean reward under B minus under A, on the prompts both scans have"
                         if gain_source == "scans" else log["formula"] if log else None),
        "tasks": tasks,
        "relation": relation,
        "drift": drift if drift is not None else {"kind": None, "reason": drift_reason},
        "warnings": warnings,
        "notes": notes,
    }


# Settings whose difference between A and B changes what the gain or the gradients mean.
SAMPLING_SETTINGS = ("group_size", "temperature", "top_p", "max_new_tokens")


def setting_warnings(a: dict[str, Any], b: dict[str, Any] | None, a_name: str = "A",
                     b_name: str = "B") -> list[dict[str, str]]:
    """What makes A and B's figures not comparable as "before and after training": the same
    checkpoint, or different rewards, advantages, loss or sampling settings."""
    if b is None:
        return []
    warnings = []
    fingerprint = a["model"].get("fingerprint")
    same_adapter = a.get("config", {}).get("adapter") == b.get("config", {}).get("adapter")
    if fingerprint and fingerprint == b["model"].get("fingerprint") and same_adapter:
        warnings.append({"code": "same_checkpoint", "message": (
            f"{a_name} and {b_name} scanned the same checkpoint (identical weights): the gains are "
            "sampling noise, not learning")})
    changed = [t for t in a["tasks"] if _reward(a, t) != _reward(b, t)]
    if changed:
        listed = "; ".join(f"{t}: {_reward(a, t)} -> {_reward(b, t)}" for t in changed)
        warnings.append({"code": "different_rewards", "message": (
            f"{a_name} and {b_name} scored with different rewards ({listed}): those gains mix "
            "learning with the change of reward")})
    for key, what in (("advantage", "advantages"), ("loss", "loss aggregations")):
        if a[key]["name"] != b[key]["name"]:
            warnings.append({"code": f"different_{key}", "message": (
                f"{a_name} and {b_name} used different {what} ({a[key]['name']} -> "
                f"{b[key]['name']}): the gradient figures are not comparable")})
    config_a, config_b = a.get("config", {}), b.get("config", {})
    sampling = [f"{k} {config_a.get(k)} -> {config_b.get(k)}" for k in SAMPLING_SETTINGS
                if config_a.get(k) != config_b.get(k)]
    if sampling:
        warnings.append({"code": "different_sampling", "message": (
            f"{a_name} and {b_name} sampled differently ({', '.join(sampling)}): mean rewards, and "
            "so the gains, depend on these settings as well as on training")})
    return warnings


def _reward(document: dict[str, Any], task: str) -> str | None:
    """A task's reward spec: scan.json `rewards` (1.1), else the --reward options of `config`."""
    recorded = (document.get("rewards") or {}).get(task)
    if recorded is not None:
        return recorded["spec"]
    options = document.get("config", {}).get("rewards", [])
    named = [spec for item in options for t, sep, spec in [item.partition("=")] if sep and t == task]
    defaults = [item for item in options if "=" not in item]
    return (named or defaults or [document.get("config", {}).get("default_reward")])[-1]


def window_warnings(log: dict[str, Any] | None) -> list[dict[str, str]]:
    """A log gain over a short window, or over windows the log does not fill."""
    if log is None:
        return []
    window, step = log["window"], log["step"]
    warnings = []
    if window < SHORT_WINDOW:
        warnings.append({"code": "short_window", "message": (
            f"the log gains average {window} step(s) before and after step {step}: a short window "
            f"makes each gain noisy; use --window {SHORT_WINDOW} or more where the log allows")})
    partial = [t for t, row in log["tasks"].items()
               if min(row.get("n_before_steps", window), row.get("n_after_steps", window)) < window]
    if partial:
        warnings.append({"code": "partial_window", "message": (
            f"the log does not fill both {window}-step windows around step {step} for "
            f"{', '.join(partial)}: those gains average fewer steps")})
    return warnings


def _identity(document: dict[str, Any], name: str) -> dict[str, Any]:
    return {"path": name, "model": document["model"]["path"],
            "fingerprint": document["model"].get("fingerprint"), "created": document.get("created")}


def compare_paths(a_path: Path, b_path: Path | None, log_path: Path | None = None,
                  window: int | None = None, step: float | None = None) -> dict[str, Any]:
    """Read scans (and their task_grads.safetensors) and a log from disk, then compare them."""
    a = artifacts.read_scan(a_path)
    b = artifacts.read_scan(b_path) if b_path is not None else None
    if b is not None:
        _check_same_tasks(a, b, str(a_path), str(b_path))
    log = gains.read_gains(log_path, window, step) if log_path is not None else None
    drift, reason = None, None
    if b is not None:
        files = [_grads_file(p) for p in (a_path, b_path)]
        lacking = [str(f) for f in files if not f.is_file()]
        if lacking:
            reason = f"no drift: {', '.join(lacking)} missing (scans before task_grads were saved)"
        else:
            drift = task_grads.drift(task_grads.read(files[0]), task_grads.read(files[1]))
    return compare_documents(a, b, drift, log, str(a_path), str(b_path) if b_path else "B", reason)


def _grads_file(path: Path) -> Path:
    path = Path(path)
    return (path if path.is_dir() else path.parent) / artifacts.TASK_GRADS_FILE
