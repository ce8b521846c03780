"""The pictures agree with the report: the verdict's norm is drawn and labelled, and the prompts
the statistics exclude are marked as excluded."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from gradprobe.views import plots  # noqa: E402


@pytest.fixture(scope="module")
def document(demo_scan_dir) -> dict:
    return json.loads((demo_scan_dir / "scan.json").read_text())


def test_task_norms_show_the_verdicts_norm_labelled(document):
    figure = plots.task_norms_figure(document)
    verdict_axes = next(ax for ax in figure.axes if "grad_norm" in ax.get_title())
    heights = [bar.get_height() for bar in verdict_axes.patches]
    assert heights == pytest.approx([t["grad_norm"] for t in document["tasks"].values()])
    labels = [text.get_text() for text in verdict_axes.texts]
    assert labels == [f"{t['norm_ratio']:.2f}x" for t in document["tasks"].values()]


def test_prompts_marks_the_excluded_prompts(document):
    excluded = [r for r in document["prompts"] if r["zero_advantage"] or r["prompt_grad_norm"] == 0]
    assert excluded, "the demo has degenerate groups"
    figure = plots.prompts_figure(document)
    for ax in figure.axes[:2]:
        kept = [c for c in ax.collections if not c.get_label().startswith("excluded")]
        assert all(y > 0 for c in kept for _, y in c.get_offsets())
        marked = [c for c in ax.collections if c.get_label().startswith("excluded")]
        assert len(marked) == 1 and len(marked[0].get_offsets()) == len(excluded)
