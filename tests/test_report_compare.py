"""report (--json/--markdown/--html/--plots/--fail-on), compare, gains and task_grads.safetensors.

One module-scoped set of scans of a tiny model: A, then B after a few plain policy-gradient
(REINFORCE) steps on the `echo` task using A's rollouts, each saved exactly and as a projection.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import MIX_ROWS, policy_gradient_steps, save_tiny_model, write_jsonl
from gradprobe import schema, task_grads
from gradprobe.cli import app
from gradprobe.gradients import projection
from gradprobe.pipeline import ScanConfig, scan

runner = CliRunner()
REWARDS = ["add=numeric", "echo=regex:^[a-z]", "regex:[a-m]"]  # echo: completion starts lowercase


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    model_a = save_tiny_model(root / "model_a")
    mix = write_jsonl(root / "mix.jsonl", MIX_ROWS)

    def config(model: Path, out: str, **extra) -> ScanConfig:
        return ScanConfig(model=str(model), mix=str(mix), out=str(root / out), prompts_per_task=4,
                          group_size=6, max_new_tokens=4, rewards=REWARDS, **extra)

    scan(config(model_a, "a"))
    model_b = policy_gradient_steps(model_a, root / "a" / "rollouts.jsonl", "echo", root / "model_b",
                                    steps=8, lr=0.02, optimiser=torch.optim.Adam)
    scan(config(model_b, "b"))
    scan(config(model_a, "a_proj", task_grads_limit_mb=0.0))
    scan(config(model_b, "b_proj", task_grads_limit_mb=0.0))
    return {"root": root, "a": root / "a", "b": root / "b", "a_proj": root / "a_proj",
            "b_proj": root / "b_proj", "mix": mix}


def load(path: Path) -> dict:
    return json.loads((path / "scan.json").read_text())


def test_scan_json_validates_and_saves_exact_task_gradients(scans):
    document = load(scans["a"])
    schema.validate(document, "scan")
    assert document["task_grads"]["kind"] == "exact"
    saved = task_grads.read(scans["a"] / "task_grads.safetensors")
    assert saved.tasks == list(document["tasks"])
    for task, row in document["tasks"].items():  # the saved g_t is the one the norms describe
        assert float(saved.task_vector(task).norm()) == pytest.approx(row["grad_norm"], rel=1e-4)
    s, t = saved.tasks[:2]
    exact = projection.cosine(saved.task_vector(s), saved.task_vector(t))
    assert exact == pytest.approx(document["cosine"]["matrix"][0][1], abs=1e-4)


def test_projected_task_gradients_estimate_norms_and_cosines(scans):
    document = load(scans["a_proj"])
    schema.validate(document, "scan")
    info = document["task_grads"]
    assert info["kind"] == "projected" and info["dim"] >= 1024 and info["seed"] == 0
    assert info["projection"] == "countsketch" and "--task-grads-limit" in info["reason"]
    saved = task_grads.read(scans["a_proj"] / "task_grads.safetensors")
    assert saved.tensors["projection"].shape == (3, info["dim"])
    bound = projection.cosine_error_bound(info["dim"])
    for task, row in document["tasks"].items():  # JL: ||P g||^2 / ||g||^2 = 1 +- about 2 sqrt(2/k)
        ratio = float(saved.task_vector(task).norm()) ** 2 / row["grad_sq_norm"]
        assert abs(ratio - 1) < 4 * (2 / info["dim"]) ** 0.5
    names, matrix = document["cosine"]["tasks"], document["cosine"]["matrix"]
    for i in range(3):
        for j in range(i + 1, 3):
            estimate = projection.cosine(saved.task_vector(names[i]), saved.task_vector(names[j]))
            assert abs(estimate - matrix[i][j]) <= 2 * bound


def test_projection_error_bound_on_model_gradients(scans):
    """Projected drift cosines of real task gradients against the exact ones, over many seeds."""
    a = task_grads.read(scans["a"] / "task_grads.safetensors")
    b = task_grads.read(scans["b"] / "task_grads.safetensors")
    dim = projection.MIN_DIM
    bound = projection.cosine_error_bound(dim)
    errors, covered = [], 0
    for seed in range(8):
        pa, pb = projection.count_sketch(a.tensors, dim, seed), projection.count_sketch(b.tensors, dim, seed)
        for t, task in enumerate(a.tasks):
            exact = projection.cosine(a.task_vector(task), b.task_vector(task))
            estimate = projection.cosine(pa[t], pb[t])
            errors.append(abs(estimate - exact))
            lo, hi = projection.cosine_interval(estimate, dim)
            covered += lo <= exact <= hi
    assert max(errors) < 2 * bound
    assert sum(e <= bound for e in errors) >= 0.8 * len(errors)
    assert covered >= 0.8 * len(errors)


def test_report_json_markdown_html_plots(scans, tmp_path):
    result = run("report", scans["a"], "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    schema.validate(document, "report")
    assert document["alerts"] == [] and document["checks"] == []
    markdown = run("report", scans["a"], "--markdown")
    assert markdown.exit_code == 0
    assert "| task | norm | sq norm |" in markdown.stdout and "### Imbalance across tasks" in markdown.stdout
    assert "**" + load(scans["a"])["verdict"] + "**" in markdown.stdout
    page, pictures = tmp_path / "report.html", tmp_path / "pictures"
    result = run("report", scans["a"], "--html", page, "--plots", pictures)
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "http://" not in html and "https://" not in html and "<table>" in html
    for name in ("task_norms.png", "cosine.png", "prompts.png"):
        assert (pictures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("op, offset, fires", [
    (">", -1e-6, True), (">", 0, False), (">=", 0, True), (">=", 1e-6, False),
    ("<", 1e-6, True), ("<", 0, False), ("<=", 0, True), ("<=", -1e-6, False),
    ("==", 0, True), ("==", 1e-6, False), ("!=", 1e-6, True), ("!=", 0, False),
])
def test_fail_on_operators_and_exit_codes(scans, op, offset, fires):
    value = load(scans["a"])["tasks"]["echo"]["share"]
    expression = f"share[echo]{op}{value + offset!r}"
    result = run("report", scans["a"], "--json", "--fail-on", expression)
    assert result.exit_code == (1 if fires else 0), result.output
    document = json.loads(result.stdout)
    schema.validate(document, "report")
    assert [c["fired"] for c in document["checks"]] == [fires]
    assert [a["expression"] for a in document["alerts"]] == ([expression] if fires else [])
    assert document["checks"][0]["value"] == value
    console = run("report", scans["a"], "--fail-on", expression)
    assert console.exit_code == (1 if fires else 0)
    assert ("ALERT share[echo]" in console.output) == fires


def test_fail_on_scan_level_names_and_star(scans):
    document = load(scans["a"])
    ratio = max(t["norm_ratio"] for t in document["tasks"].values())
    result = run("report", scans["a"], "--fail-on", f"max_norm_ratio>{ratio / 2}",
                 "--fail-on", "min_cosine<-2", "--fail-on", "degenerate_fraction[*]>=0")
    assert result.exit_code == 1, result.output
    assert "ALERT max_norm_ratio" in result.output and "min_cosine" in result.output
    assert all(f"degenerate_fraction[{t}]" in result.output for t in document["tasks"])
    assert run("report", scans["a"], "--fail-on", "n_tasks==3").exit_code == 1
    assert run("report", scans["a"], "--fail-on", "n_tasks!=3").exit_code == 0
    assert run("report", scans["a"], "--fail-on", "min_cosine<-2").exit_code == 0


@pytest.mark.parametrize("expression, fragments", [
    ("max_norm_ratio", ["not an expression"]),
    ("max_norm_ratio >> 3", ["not an expression"]),
    ("max_norm_ratio>eight", ["not a number"]),
    ("no_such_metric>1", ["unknown metric 'no_such_metric'", "max_norm_ratio", "share[TASK]"]),
    ("share>0.5", ["per task", "share[TASK]", "add"]),
    ("share[nope]>0.5", ["no task 'nope'", "echo"]),
    ("max_share[add]>0.5", ["takes no [TASK]"]),
])
def test_fail_on_bad_expressions(scans, expression, fragments):
    assert_user_error(run("report", scans["a"], "--json", "--fail-on", expression), *fragments)


def test_compare_reports_the_gain_of_the_trained_task(scans, tmp_path):
    result = run("compare", scans["a"], scans["b"], "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    schema.validate(document, "compare")
    gains = {t: row["gain"] for t, row in document["tasks"].items()}
    a, b = load(scans["a"]), load(scans["b"])
    assert gains["echo"] == pytest.approx(b["tasks"]["echo"]["mean_reward"] - a["tasks"]["echo"]["mean_reward"])
    assert gains["echo"] > 0.1 and gains["echo"] == max(gains.values())
    for task, row in document["tasks"].items():
        assert row["grad_norm_change"] == pytest.approx(b["tasks"][task]["grad_norm"] - a["tasks"][task]["grad_norm"])
        assert row["share_change"] == pytest.approx(b["tasks"][task]["share"] - a["tasks"][task]["share"])
        assert row["gain_per_sq_norm"] == pytest.approx(row["gain"] / a["tasks"][task]["grad_sq_norm"])
        assert -1 <= row["drift_cosine"] <= 1
    assert document["drift"]["kind"] == "exact" and document["drift"]["error_bound_95"] == 0
    relation = {r["against"]: r for r in document["relation"]}
    assert relation["grad_sq_norm"]["n"] == 3 and "only 3 tasks" in relation["grad_sq_norm"]["note"]
    assert any("only 3 tasks" in n for n in document["notes"])
    console = run("compare", scans["a"], scans["b"])
    assert console.exit_code == 0 and "Learning gains per task" in console.output
    assert "only 3 tasks" in console.output
    fired = run("compare", scans["a"], scans["b"], "--json", "--fail-on", "gain[echo]>0",
                "--fail-on", "min_drift_cosine<-5")
    assert fired.exit_code == 1
    alerts = json.loads(fired.stdout)["alerts"]
    assert [a["expression"] for a in alerts] == ["gain[echo]>0"]
    assert run("compare", scans["a"], scans["b"], "--fail-on", "gain[echo]<0").exit_code == 0
    assert_user_error(run("compare", scans["a"], scans["b"], "--fail-on", "max_norm_ratio>1"),
                      "unknown metric", "drift_cosine[TASK]")
    pictures = tmp_path / "pics"
    result = run("compare", scans["a"], scans["b"], "--plots", pictures, "--markdown")
    assert result.exit_code == 0, result.output
    assert "### Learning gains per task" in result.stdout
    assert (pictures / "gain_vs_grad_sq_norm.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_projected_drift_is_within_its_bound(scans):
    exact = json.loads(run("compare", scans["a"], scans["b"], "--json").stdout)
    result = run("compare", scans["a_proj"], scans["b_proj"], "--json")
    assert result.exit_code == 0, result.output
    projected = json.loads(result.stdout)
    schema.validate(projected, "compare")
    drift = projected["drift"]
    assert drift["kind"] == "projected" and drift["dim"] >= 1024 and drift["seed"] == 0
    assert drift["projection"] == "countsketch"
    assert drift["error_bound_95"] == pytest.approx(1.96 / drift["dim"] ** 0.5, rel=1e-3)
    for task, row in projected["tasks"].items():
        truth = exact["tasks"][task]["drift_cosine"]
        assert abs(row["drift_cosine"] - truth) <= drift["error_bound_95"]
        lo, hi = row["drift_cosine_ci"]
        assert lo < row["drift_cosine"] < hi and lo <= truth <= hi
    console = run("compare", scans["a_proj"], scans["b_proj"])
    assert "projected" in console.output and "95%" in console.output


def legacy_gaussian_copy(scan_dir: Path, out: Path) -> Path:
    """A copy of an exact scan whose task_grads.safetensors is what gradprobe wrote before the
    count sketch: the Gaussian projection to 2048 dimensions, with no `projection` in the metadata."""
    from safetensors.torch import save_file

    shutil.copytree(scan_dir, out)
    exact = task_grads.read(scan_dir / "task_grads.safetensors")
    metadata = {"format": "pt", "gradprobe": "task_grads", "kind": "projected",
                "tasks": json.dumps(exact.tasks), "params": json.dumps(exact.params), "dim": "2048",
                "seed": "0", "method": "Gaussian N(0, 1/dim) per parameter, CPU torch.Generator "
                                       "seeded with seed + crc32(name)"}
    sketch = projection.gaussian_projection(exact.tensors, 2048, 0).float()
    save_file({"projection": sketch}, str(out / "task_grads.safetensors"), metadata=metadata)
    return out


def test_compare_reads_older_gaussian_files_and_refuses_mixing_them(scans, tmp_path):
    exact = json.loads(run("compare", scans["a"], scans["b"], "--json").stdout)
    old_a, old_b = (legacy_gaussian_copy(scans[k], tmp_path / k) for k in ("a", "b"))
    result = run("compare", old_a, old_b, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    schema.validate(document, "compare")
    drift = document["drift"]
    assert (drift["kind"], drift["projection"], drift["dim"]) == ("projected", "gaussian", 2048)
    for task, row in document["tasks"].items():
        assert abs(row["drift_cosine"] - exact["tasks"][task]["drift_cosine"]) <= 2 * drift["error_bound_95"]
    assert_user_error(run("compare", old_a, scans["b_proj"]), "not comparable", "gaussian", "countsketch")


def test_compare_refuses_incomparable_task_gradients(scans, tmp_path):
    assert_user_error(run("compare", scans["a"], scans["b_proj"]), "not comparable", "exact", "projected")
    other = tmp_path / "other_seed"
    shutil.copytree(scans["b_proj"], other)
    saved = task_grads.read(other / "task_grads.safetensors")
    saved.seed = 7
    task_grads.write(other / "task_grads.safetensors", saved)
    assert_user_error(run("compare", scans["a_proj"], other), "not comparable", "seed")
    saved.seed, saved.dim = 0, saved.dim // 2
    saved.tensors["projection"] = saved.tensors["projection"][:, : saved.dim].contiguous()
    task_grads.write(other / "task_grads.safetensors", saved)
    assert_user_error(run("compare", scans["a_proj"], other), "not comparable", "dim")
    saved.dim = 2 * saved.dim
    saved.seed, saved.params = 0, saved.params[1:]
    task_grads.write(other / "task_grads.safetensors", saved)
    assert_user_error(run("compare", scans["a_proj"], other), "not comparable", "parameter names")


def test_bad_inputs_get_one_line_and_exit_2(scans, tmp_path):
    assert_user_error(run("report", tmp_path / "missing"), "no scan.json")
    assert_user_error(run("compare", scans["a"], tmp_path / "missing"), "no scan.json")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "scan.json").write_text('{"schema_version": "1.0", "tasks": {')
    assert_user_error(run("report", corrupt), "corrupt scan file")
    assert_user_error(run("compare", scans["a"], corrupt), "corrupt scan file")
    fewer = tmp_path / "fewer"
    shutil.copytree(scans["b"], fewer)
    document = load(fewer)
    del document["tasks"]["chat"]
    (fewer / "scan.json").write_text(json.dumps(document))
    assert_user_error(run("compare", scans["a"], fewer), "different tasks", "chat")
    broken = tmp_path / "broken"
    shutil.copytree(scans["b"], broken)
    (broken / "task_grads.safetensors").write_bytes(b"not a safetensors file")
    assert_user_error(run("compare", scans["a"], broken), "corrupt task gradients")
    assert_user_error(run("compare", scans["a"]), "second scan B", "--log")
    assert_user_error(run("report", scans["a"], "--json", "--markdown"), "choose one")
    assert_user_error(run("report", scans["a"], "--html", tmp_path / "nodir" / "r.html"), "does not exist")


def test_missing_task_grads_file_leaves_drift_out(scans, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(scans["b"], old)
    (old / "task_grads.safetensors").unlink()
    result = run("compare", scans["a"], old, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    schema.validate(document, "compare")
    assert document["drift"]["kind"] is None and "missing" in document["drift"]["reason"]
    assert all(row["drift_cosine"] is None for row in document["tasks"].values())


def test_gains_from_a_log_and_beside_a_scan(scans, tmp_path):
    log = tmp_path / "train.csv"
    lines = ["step,task,reward"]
    for step in range(12):
        for task, slope in (("add", 0.0), ("echo", 0.1), ("chat", 0.05)):
            lines += [f"{step},{task},{slope * step}", f"{step},{task},{slope * step + 0.2}"]
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "gains.json"
    result = run("gains", log, "--window", "3", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    schema.validate(document, "gains")
    assert json.loads(out.read_text()) == document
    # default step: the earliest with a whole window before it (3); R(s) = slope s + 0.1
    assert document["step"] == 3
    assert document["tasks"]["echo"]["gain"] == pytest.approx(0.1 * (5 - 1))  # means at 5 and 1
    assert document["tasks"]["add"]["gain"] == pytest.approx(0.0)
    at = json.loads(run("gains", log, "--window", "2", "--step", "6", "--json").stdout)
    assert at["tasks"]["chat"]["gain"] == pytest.approx(0.05 * (7.5 - 4.5))
    assert at["tasks"]["chat"]["n_before_steps"] == 2
    console = run("gains", log, "--window", "3")
    assert console.exit_code == 0 and "Windowed learning gain at step 3" in console.output
    for source in (out, log):
        result = run("compare", scans["a"], "--log", source, "--window", "3", "--json")
        assert result.exit_code == 0, result.output
        compared = json.loads(result.stdout)
        schema.validate(compared, "compare")
        assert compared["gain_source"] == "log" and compared["b"] is None
        assert compared["tasks"]["echo"]["gain"] == pytest.approx(0.4)
        assert compared["relation"][0]["gain"] == "log"
    both = json.loads(run("compare", scans["a"], scans["b"], "--log", log, "--window", "3", "--json").stdout)
    schema.validate(both, "compare")
    assert {r["gain"] for r in both["relation"]} == {"scans", "log"}
    assert both["tasks"]["echo"]["log_gain"] == pytest.approx(0.4)
    jsonl = write_jsonl(tmp_path / "train.jsonl", [{"step": 0, "task": "add", "reward": 1.0}, {"step": 1}])
    assert_user_error(run("gains", jsonl), "train.jsonl:2", "no task, reward")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0, "task": "a", "reward": 1}\n{oops\n')
    assert_user_error(run("gains", bad), "bad.jsonl:2", "malformed")
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("iteration,task,reward\n0,a,1\n")
    assert_user_error(run("gains", renamed), "missing column", "step", "--step-field")
    one_step = write_jsonl(tmp_path / "one.jsonl", [{"step": 0, "task": "add", "reward": 1.0}])
    assert_user_error(run("gains", one_step), "no step", "--window")
    assert_user_error(run("compare", scans["a"], "--log", out, "--window", "4"), "window 3", "recompute")
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"step": s, "task": "add", "reward": 1.0} for s in range(9)])
    assert_user_error(run("compare", scans["a"], "--log", partial, "--window", "2"), "no rows for task", "echo")


def test_pictures_need_matplotlib(scans, tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("report", scans["a"], "--plots", tmp_path / "p")
    assert_user_error(result, "matplotlib", "pip install 'gradprobe[plots]'")
    assert_user_error(run("report", scans["a"], "--html", tmp_path / "r.html"), "matplotlib")
    assert not (tmp_path / "p").exists() and not (tmp_path / "r.html").exists()
    assert run("report", scans["a"], "--markdown").exit_code == 0  # text views need no matplotlib
