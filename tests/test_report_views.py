"""One report model, rendered by every view: console (80 columns and pipes), markdown, HTML and
JSON say the same verdict, findings and caveats, and show each number once."""

from __future__ import annotations

import html
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gradprobe.caveats import scan_caveats
from gradprobe.cli import app
from gradprobe.views.console import render_scan
from gradprobe.views.html import scan_html
from gradprobe.views.markdown import scan_markdown
from gradprobe.views.model import scan_report

runner = CliRunner()


@pytest.fixture(scope="module")
def document(demo_scan_dir) -> dict:
    return json.loads((demo_scan_dir / "scan.json").read_text())


def console_text(document: dict, width: int = 80) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))
    console.print(render_scan(document))
    return console.export_text()


def squash(text: str) -> str:
    return " ".join(text.split())


def test_every_view_shows_the_same_verdict_findings_caveats_and_sections(document):
    report = scan_report(document)
    assert report.headline == document["verdict"]
    # the statistics' sentences, less the one the headline already says (each sentence once)
    assert report.findings == [v for v in document["stats"]["verdicts"]
                               if not document["verdict"].startswith(v.rstrip("."))]
    assert len(report.findings) == len(document["stats"]["verdicts"]) - 1
    assert [c["message"] for c in document["caveats"]] == report.caveats
    views = {"console": console_text(document, width=200), "markdown": scan_markdown(document),
             "html": scan_html(document, {})}
    for name, text in views.items():
        flat = squash(html.unescape(text).replace("\\|", "|"))
        for line in [report.headline, *report.findings, *report.caveats]:
            assert squash(line) in flat, (name, line)
        for section in report.sections:
            assert squash(section.title) in flat, (name, section.title)


def test_a_ratio_is_printed_with_one_interval(document):
    """A ratio's interval is the dominance test's, shown in its pairwise table in every view; the
    gradients table's plain norm ratio carries no second interval."""
    views = [console_text(document, width=200), scan_markdown(document), html.unescape(scan_html(document, {}))]
    for row in document["stats"]["dominance"]["pairs"]:
        if row["lo"] is None:
            continue
        shown = f"[{row['lo']:.2f}, " + ("-" if row["hi"] is None else f"{row['hi']:.2f}") + "]"
        for text in views:
            assert shown in text, (row["a"], row["b"], shown)
    gradients = views[0].split("Per-task gradients")[1].split("norm: grad_norm")[0]
    for task in document["tasks"]:
        line = next(line for line in gradients.splitlines() if line.split()[:1] == [task])
        assert line.count("[") == 1  # U's interval only


def test_markdown_and_html_lead_with_the_verdict_then_the_statistics(document):
    markdown = scan_markdown(document)
    first_table = markdown.index("\n|")
    assert markdown.split("\n")[2] == f"**{document['verdict']}**"
    for finding in document["stats"]["verdicts"]:
        assert markdown.index(finding.replace("|", "\\|")) < first_table
    for caveat in document["caveats"]:
        assert markdown.index(caveat["message"]) < first_table
    page = scan_html(document, {})
    assert page.index('class="verdict"') < page.index("<li>") < page.index("<table>")


def test_tables_fit_80_columns_and_keep_long_task_names(document):
    long_names = {"add": "arithmetic_addition", "count": "letter_counting_task"}
    text = json.dumps(document)
    for short, long in long_names.items():
        text = text.replace(f'"{short}"', f'"{long}"')
    renamed = json.loads(text)
    output = console_text(renamed)
    assert max(len(line) for line in output.splitlines()) <= 80
    assert "…" not in output
    for name in long_names.values():
        assert name in output or name[:12] in output  # folded within its cell, never cut off
    assert re.search(r"rollou…|degene…|pos_grad_no…", console_text(document)) is None


def test_piped_report_is_not_cut(demo_scan_dir):
    result = runner.invoke(app, ["report", str(demo_scan_dir)])
    assert result.exit_code == 0
    assert "…" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def _task(**figures):
    return {"n_prompts": 4, "mean_reward": 0.0, "degenerate_fraction": 0.0,
            "grad_sq_norm_unbiased": 1.0, **figures}


def _prompt(task: str, prompt_id: str, norm: float) -> dict:
    return {"task": task, "prompt_id": prompt_id, "prompt_grad_norm": norm}


def test_caveats_name_their_true_cause():
    tasks = {"math": _task(degenerate_fraction=1.0, grad_sq_norm_unbiased=0.0),
             "code": _task(mean_reward=0.4, grad_sq_norm_unbiased=-0.2),
             "chat": _task(mean_reward=0.5)}
    prompts = ([_prompt("math", f"m{i}", 0.0) for i in range(4)]
               + [_prompt("code", f"c{i}", 1.0) for i in range(4)]
               + [_prompt("chat", "h0", 10.0)] + [_prompt("chat", f"h{i}", 1.0) for i in range(1, 4)])
    caveats = {c["code"]: c for c in scan_caveats(tasks, prompts)}
    assert caveats["no_reward_signal"]["tasks"] == ["math"]
    assert "all rewards are equal" in caveats["no_reward_signal"]["message"]
    assert caveats["signal_below_noise"]["tasks"] == ["code"]  # not math: its cause is no signal
    assert "--prompts-per-task" in caveats["signal_below_noise"]["message"]
    assert caveats["one_prompt_carries_norm"]["tasks"] == ["chat"]
    assert "h0" in caveats["one_prompt_carries_norm"]["message"]


def test_caveats_reach_scan_json_and_every_output(document, demo_scan_dir):
    assert document["caveats"], "the demo has a task whose U <= 0"
    message = document["caveats"][0]["message"]
    report_json = json.loads(runner.invoke(app, ["report", str(demo_scan_dir), "--json"]).stdout)
    assert report_json["caveats"] == document["caveats"]
    markdown = runner.invoke(app, ["report", str(demo_scan_dir), "--markdown"]).stdout
    assert message in markdown
    assert squash(message) in squash(runner.invoke(app, ["report", str(demo_scan_dir)]).stdout)


def test_undefined_interval_ends_render_as_dashes(document):
    """An interval with an undefined end (unbounded, or too few prompts) renders, in every view."""
    broken = json.loads(json.dumps(document))
    other = next(iter(broken["tasks"]))
    broken["tasks"][other]["grad_sq_norm_unbiased_ci"] = [broken["tasks"][other]["grad_sq_norm_unbiased"], None]
    broken["stats"]["dominance"]["pairs"][0]["hi"] = None
    text = console_text(broken).split("Per-task gradients")[1]
    row = next(line for line in text.splitlines() if line.split()[:1] == [other])
    assert ", -]" in row
    assert scan_markdown(broken) and scan_html(broken, {})


def test_a_dominance_test_in_the_statistics_is_shown(document):
    with_test = json.loads(json.dumps(document))
    with_test["stats"]["dominance"] = {"leaders": ["add", "count"], "p_holm_max": 0.56,
                                       "dominant": None, "pairs": [{"a": "add", "b": "solve"}]}
    markdown = scan_markdown(with_test)
    assert "### Dominance" in markdown
    assert "| leaders | add, count |" in markdown and "| p holm max | 0.56 |" in markdown
    assert "| dominant | - |" in markdown and "pairs" not in markdown.split("### Dominance")[1].split("###")[0]


def test_a_dominance_test_with_pairs_shows_each_ratio_with_its_interval(document):
    with_test = json.loads(json.dumps(document))
    with_test["stats"]["dominance"] = {
        "method": "Fieller", "level": 0.95, "leading": ["count", "add"], "dominant": None,
        "single_prompt": [],
        "pairs": [{"a": "count", "b": "add", "ratio": 1.04, "lo": 0.61, "hi": 1.9, "p_holm": 0.8,
                   "reason": None},
                  {"a": "count", "b": "solve", "ratio": 2.2, "lo": 1.3, "hi": None, "p_holm": 0.01,
                   "reason": "unbounded above"}]}
    markdown = scan_markdown(with_test)
    assert "| count | add | 1.04 | [0.61, 1.90] | 0.8 |  |" in markdown
    assert "| count | solve | 2.20 | [1.30, -] |" in markdown
    assert "leading: count, add; dominant: none" in markdown
    assert scan_caveats(with_test["tasks"], with_test["prompts"], with_test["stats"]) == [
        c for c in scan_caveats(with_test["tasks"], with_test["prompts"])
        if c["code"] != "one_prompt_carries_norm"]
