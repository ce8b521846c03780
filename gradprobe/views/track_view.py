"""A track (gradprobe.track) as markdown, a console table and pictures.

Self-contained on purpose: it reads only track.json's plain data.
Pictures (matplotlib, extra `plots`): share over steps, gain over steps, share against gain.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

HEADER = ("task", "step", "share", "grad_norm", "unbiased sq norm (95% CI)", "mean reward", "gain")


def _number(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _interval(point: dict[str, Any]) -> str:
    value = point["grad_sq_norm_unbiased"]
    lo, hi = point["grad_sq_norm_unbiased_ci"] or (None, None)
    if value is None:
        return "-"
    return f"{value:.3g}" + (f" ({_number(lo)}, {_number(hi)})" if lo is not None else "")


def series_rows(document: dict[str, Any]) -> list[list[str]]:
    """One row per task and checkpoint step, as text cells in HEADER's order."""
    return [[task, str(p["step"]), _number(p["share"], ".1%"), _number(p["grad_norm"], ".4g"), _interval(p),
             _number(p["mean_reward"], ".3f"), _number(p["gain"], "+.3f")]
            for task in document["tasks"] for p in document["series"][task]]


def correlation_sentence(document: dict[str, Any]) -> str:
    """The share-gain correlation in one sentence, or why there is none."""
    c = document["share_gain"]
    if c["rho"] is None:
        return f"Share against gain: no correlation ({c.get('reason')}, n = {c['n']})."
    return (f"Share against gain over {c['n']} (task, step) points ({c['n_tasks']} tasks, {c['n_steps']} steps): "
            f"Spearman rho = {c['rho']:+.2f}, 95% CI ({c['lo']:+.2f}, {c['hi']:+.2f}), p = {c['p']:.3g}; "
            f"permuting gains within steps p = {c['p_within_steps']:.3g}.")


def _source_lines(document: dict[str, Any]) -> list[str]:
    lines = [f"run: {document['run_dir']} ({len(document['checkpoints'])} checkpoints, steps "
             f"{document['checkpoints'][0]['step']}..{document['checkpoints'][-1]['step']})"]
    if document["dumps"]:
        d = document["dumps"]
        lines.append(f"rollouts: {d['n_files']} {'/'.join(d['formats'])} dumps, steps {d['steps'][0]}..{d['steps'][1]}, "
                     f"{d['n_rows']} rows, {d['n_unmatched']} unmatched")
    else:
        lines.append(f"rollouts: sampled fresh from {document['mix']}")
    lines.append(f"gain: {document['gain_formula']} (w = {document['window']}; {document['reward_source']})")
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def track_markdown(document: dict[str, Any]) -> str:
    """track.md: where the numbers came from, the correlation, the series table, the notes."""
    out = ["## gradprobe track", "", f"**{_cell(correlation_sentence(document))}**", ""]
    out += [f"- {_cell(line)}" for line in _source_lines(document)]
    out += [f"- note: {_cell(n)}" for n in document["notes"]] + ["", "### Per task and checkpoint", ""]
    out += ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|"]
    out += ["| " + " | ".join(map(_cell, row)) + " |" for row in series_rows(document)]
    return "\n".join(out) + "\n"


def render_track(document: dict[str, Any]) -> RenderableType:
    """The console view: the correlation sentence, sources and the series table."""
    table = Table(title="Per task and checkpoint", title_justify="left")
    for i, name in enumerate(HEADER):
        table.add_column(name, style="bold" if i == 0 else None, justify="left" if i < 2 else "right")
    for row in series_rows(document):
        table.add_row(*row)
    parts: list[RenderableType] = [Text(correlation_sentence(document), style="bold")]
    parts += [Text(line, style="dim") for line in _source_lines(document)]
    parts += [Text(f"note: {n}", style="yellow") for n in document["notes"]]
    return Group(*parts, table)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _over_steps(plt: Any, document: dict[str, Any], key: str, label: str, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(7.0, 4.2), layout="constrained")
    for task in document["tasks"]:
        points = [p for p in document["series"][task] if p[key] is not None]
        ax.plot([p["step"] for p in points], [p[key] for p in points], marker="o", label=task)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training step (checkpoint)")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="task", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def _share_against_gain(plt: Any, document: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(6.6, 4.6), layout="constrained")
    for task in document["tasks"]:
        points = [p for p in document["series"][task] if p["share"] is not None and p["gain"] is not None]
        ax.scatter([p["share"] for p in points], [p["gain"] for p in points], s=40, label=task, zorder=3)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("share of the mixed update")
    ax.set_ylabel(f"learning gain (window {document['window']})")
    c = document["share_gain"]
    ax.set_title("Gain against share" + (f" (Spearman {c['rho']:+.2f}, n={c['n']})" if c["rho"] is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(title="task", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def track_figures(document: dict[str, Any]) -> dict[str, bytes]:
    """File name -> PNG bytes: share over steps, gain over steps, share against gain."""
    from gradprobe.views.plots import require_matplotlib

    plt = require_matplotlib()
    return {
        "share_over_steps.png": _over_steps(plt, document, "share", "share of the mixed update",
                                            "Gradient share per task over training"),
        "gain_over_steps.png": _over_steps(plt, document, "gain", f"learning gain (window {document['window']})",
                                           "Learning gain per task over training"),
        "share_vs_gain.png": _share_against_gain(plt, document),
    }
