"""Pictures of a scan and a comparison, as PNG bytes (matplotlib, Agg backend; extra `plots`).

- task norms: each task's grad_norm ||g_t|| (what the verdict and the ratios use), and its
  unbiased squared norm with its 95% interval (bar and whiskers) beside the plain ||g_t||^2 (dot);
- the task-gradient cosine matrix (heatmap, -1 to 1);
- per-prompt gradient norm ||u_p|| against mean reward and against mean |A|, coloured by task,
  the prompts the statistics exclude (zero gradient) in grey;
- for a comparison, the learning gain against A's squared gradient norm, one labelled dot per task.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError

MISSING = "pictures need matplotlib, which is not installed: pip install 'gradprobe[plots]'"


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or a UserInputError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        matplotlib.rcParams["text.parse_math"] = False  # task names like "$x^$" are plain text
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserInputError(MISSING) from None
    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _task_colours(plt: Any, tasks: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(tasks)}


def _tick_labels(ax: Any, labels: list[str], axis: str = "x") -> None:
    rotate = max((len(l) for l in labels), default=0) * len(labels) > 40
    if axis == "x":
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    else:
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels)


def task_norms_figure(document: dict[str, Any]) -> Any:
    """Left: ||g_t||, the norm the verdict and the ratios use, labelled with each ratio. Right:
    the unbiased squared norm with its 95% CI (bars) beside the plain ||g_t||^2 (dots)."""
    plt = require_matplotlib()
    from matplotlib.patches import Patch

    tasks = list(document["tasks"])
    rows = [document["tasks"][t] for t in tasks]
    colours = [_task_colours(plt, tasks)[t] for t in tasks]
    width = max(5.0, 1.1 * len(tasks) + 2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * width + 2.6, 4.2), layout="constrained")
    x = list(range(len(tasks)))
    norms = [r.get("grad_norm") or 0.0 for r in rows]
    left.bar(x, norms, color=colours, alpha=0.8, label="grad_norm ||g_t||")
    for i, row in enumerate(rows):
        if row.get("norm_ratio") is not None:
            left.annotate(f"{row['norm_ratio']:.2f}x", (i, norms[i]), textcoords="offset points",
                          xytext=(0, 3), ha="center", fontsize="small")
    _tick_labels(left, tasks)
    left.set_xlabel("task")
    left.set_ylabel("task-gradient norm ||g_t||")
    left.set_title("grad_norm (the verdict's; labels: norm_ratio)")

    unbiased = [r.get("grad_sq_norm_unbiased") or 0.0 for r in rows]
    ci = [r.get("grad_sq_norm_unbiased_ci") or [None, None] for r in rows]
    lower = [u - lo if lo is not None else 0.0 for u, (lo, _) in zip(unbiased, ci)]
    upper = [hi - u if hi is not None else 0.0 for u, (_, hi) in zip(unbiased, ci)]
    right.bar(x, unbiased, color=colours, alpha=0.8)
    bars = Patch(facecolor="lightgrey", edgecolor="grey", label="unbiased ||E u||^2 (U-statistic)")
    whiskers = right.errorbar(x, unbiased, yerr=[lower, upper], fmt="none", ecolor="black", capsize=5,
                              label="its 95% CI (jackknife)")
    dots = right.scatter(x, [r.get("grad_sq_norm") or 0.0 for r in rows], color="black", marker="D",
                         zorder=3, label="plain ||g_t||^2 (grad_sq_norm)")
    right.axhline(0, color="grey", linewidth=0.8)
    _tick_labels(right, tasks)
    right.set_xlabel("task")
    right.set_ylabel("squared task-gradient norm")
    right.set_title("Squared norm: unbiased with 95% CI, and plain")
    right.legend(handles=[bars, whiskers, dots], fontsize="small", loc="upper left",
                 bbox_to_anchor=(1.01, 1))
    return fig


def task_norms_png(document: dict[str, Any]) -> bytes:
    """The task-norms picture as PNG bytes."""
    return _png(task_norms_figure(document))


def cosine_png(document: dict[str, Any], key: str = "cosine") -> bytes | None:
    """Heatmap of the task-gradient cosines, each cell annotated; None below two tasks."""
    cosine = document[key]
    tasks = cosine["tasks"]
    if len(tasks) < 2:
        return None
    plt = require_matplotlib()
    import numpy as np

    matrix = np.array([[np.nan if v is None else v for v in row] for row in cosine["matrix"]], dtype=float)
    size = max(4.0, 0.9 * len(tasks) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="constrained")
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:+.2f}", ha="center", va="center", fontsize="small",
                        color="white" if abs(matrix[i, j]) > 0.6 else "black")
    _tick_labels(ax, tasks, "x")
    _tick_labels(ax, tasks, "y")
    ax.set_xlabel("task")
    ax.set_ylabel("task")
    ax.set_title("Task-gradient cosines (negative: conflict)")
    fig.colorbar(image, ax=ax, label="cos(g_s, g_t)", shrink=0.8)
    return _png(fig)


def prompts_figure(document: dict[str, Any]) -> Any:
    """Two scatters of ||u_p||: against the prompt's mean reward and its mean |A|, by task. The
    prompts the statistics exclude (all rewards equal, or a zero norm) are grey crosses."""
    plt = require_matplotlib()
    tasks = list(document["tasks"])
    colours = _task_colours(plt, tasks)
    excluded = [r for r in document["prompts"] if _excluded(r)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True, layout="constrained")
    for ax, key, label in ((axes[0], "mean_reward", "mean reward of the prompt's group"),
                           (axes[1], "mean_abs_advantage", "mean |advantage| of the prompt's group")):
        for task in tasks:
            rows = [r for r in document["prompts"] if r["task"] == task and not _excluded(r)]
            ax.scatter([r[key] for r in rows], [r["prompt_grad_norm"] for r in rows], s=22, alpha=0.75,
                       color=colours[task], label=task)
        if excluded:
            ax.scatter([r[key] for r in excluded], [r["prompt_grad_norm"] for r in excluded], s=18,
                       marker="x", color="grey", alpha=0.6,
                       label=f"excluded ({len(excluded)}): all rewards equal, zero gradient")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per-prompt gradient norm ||u_p||")
    axes[1].legend(title="task", fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Per-prompt gradient norms (grey: excluded from the statistics)")
    return fig


def _excluded(row: dict[str, Any]) -> bool:
    """Left out of the statistics, as gradprobe.stats does: zero advantage or a zero norm."""
    return bool(row.get("zero_advantage")) or not row["prompt_grad_norm"] > 0


def prompts_png(document: dict[str, Any]) -> bytes:
    """The per-prompt picture as PNG bytes."""
    return _png(prompts_figure(document))


def gain_png(document: dict[str, Any]) -> bytes:
    """A comparison's gain (y) against A's squared gradient norm (x), one labelled dot per task."""
    plt = require_matplotlib()
    tasks = list(document["tasks"])
    colours = _task_colours(plt, tasks)
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    for task in tasks:
        row = document["tasks"][task]
        if row.get("gain") is None or row.get("grad_sq_norm_a") is None:
            continue
        ax.scatter(row["grad_sq_norm_a"], row["gain"], s=60, color=colours[task], label=task, zorder=3)
        ax.annotate(task, (row["grad_sq_norm_a"], row["gain"]), textcoords="offset points",
                    xytext=(6, 6), fontsize="small")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("squared task-gradient norm ||g_t||^2 under A")
    ax.set_ylabel("learning gain (mean reward, B - A)" if document["gain_source"] == "scans"
                  else "windowed learning gain from the log")
    relation = next((r for r in document["relation"] if r["against"] == "grad_sq_norm"), None)
    title = "Learning gain against gradient size"
    if relation and relation["rho"] is not None:
        title += f" (Spearman {relation['rho']:+.2f}, n={relation['n']})"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return _png(fig)


def scan_figures(document: dict[str, Any]) -> dict[str, bytes]:
    """File name -> PNG bytes of every picture of a scan."""
    figures = {"task_norms.png": task_norms_png(document)}
    heat = cosine_png(document)
    if heat is not None:
        figures["cosine.png"] = heat
    figures["prompts.png"] = prompts_png(document)
    return figures


def compare_figures(document: dict[str, Any]) -> dict[str, bytes]:
    """File name -> PNG bytes of a comparison's pictures."""
    return {"gain_vs_grad_sq_norm.png": gain_png(document)}


def write_figures(directory: Path, figures: dict[str, bytes]) -> list[Path]:
    """Write each PNG atomically into `directory` (created if needed)."""
    from gradprobe.artifacts import write_bytes

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create {directory}: {exc.strerror}") from None
    paths = []
    for name, data in figures.items():
        write_bytes(directory / name, data)
        paths.append(directory / name)
    return paths


def share_over_steps_png(series: Any) -> bytes:
    """Each task's share of the mixed update at every probe step (a `gradprobe.series.Series`)."""
    plt = require_matplotlib()
    colours = _task_colours(plt, series.tasks)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    for task in series.tasks:
        points = [(s, v) for s, v in zip(series.steps, series.figures["share"][task]) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, color=colours[task], label=task)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.set_xlabel("training step")
    ax.set_ylabel("share of the mixed update")
    ax.set_title("Per-task share of the update over training")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)
