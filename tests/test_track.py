"""`gradprobe track` on a small synthetic run built here: a tiny model trained by real policy-gradient
steps, its checkpoints saved in TRL's and verl's layouts, with verl-format and TRL-format rollout
dumps; resume after an interruption; and the task weights for the next run in their consumers' forms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import MIX_ROWS, policy_gradient_steps, save_tiny_model, write_jsonl
from gradprobe import gains, schema
from gradprobe.cli import app

runner = CliRunner()
STEPS = 5  # dumps 1..5; checkpoints after steps 2 and 4 (they generated dumps 3 and 5)
CHECKPOINT_STEPS = (2, 4)
GROUP = 4
UNMATCHED_PER_DUMP = 2


def reward_of(completion: str, answer: str) -> float:
    """Fraction of the answer's characters that occur in the completion (varies within a group)."""
    return sum(ch in completion for ch in answer) / len(answer)


def sample_step(model_dir: Path, mix, step: int) -> list[dict]:
    """GROUP real completions of every mix prompt from the checkpoint at `model_dir`, scored."""
    from gradprobe.mix import render_prompt
    from gradprobe.model_loading import load_model
    from gradprobe.rollouts import sample_rollouts

    loaded = load_model(str(model_dir), "cpu", "float32")
    records = mix.records
    rendered = [render_prompt(loaded.tokenizer, r.prompt) for r in records]
    rollouts = sample_rollouts(loaded.model, loaded.tokenizer, records, rendered, GROUP, 5, 1.0, 1.0, seed=step)
    return [{"task": r.task, "prompt_id": r.prompt_id, "prompt": r.prompt, "completion": r.completion,
             "prompt_token_ids": r.prompt_token_ids, "completion_token_ids": r.completion_token_ids,
             "answer": r.answer, "reward": reward_of(r.completion, str(r.answer)), "step": step}
            for r in rollouts]


def trl_dump(rows: list[dict], step: int, tokenizer) -> list[dict]:
    """The rows as GradprobeCallback(dump_rollouts=True) writes a generation batch (its own code)."""
    from gradprobe.integrations.trl import StepBatch, dump_rows

    rows = sorted(rows, key=lambda r: (r["task"], r["prompt_id"]))
    batch = StepBatch([r["prompt_token_ids"] for r in rows], [r["completion_token_ids"] for r in rows],
                      [0.0] * len(rows), [r["reward"] for r in rows], [r["task"] for r in rows], GROUP)
    return dump_rows(batch, step, tokenizer, answers=[r["answer"] for r in rows])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 5-step training run: per step, sample from the current policy, dump, take a real
    policy-gradient step on one task; checkpoints after steps 2 and 4 in both layouts."""
    from gradprobe.mix import load_mix
    from gradprobe.model_loading import load_tokenizer

    root = tmp_path_factory.mktemp("run")
    mix_path = write_jsonl(root / "mix.jsonl", MIX_ROWS)
    mix = load_mix(mix_path)
    current = save_tiny_model(root / "base")
    tokenizer = load_tokenizer(str(current))
    trl, verl = root / "trl-run", root / "verl-run"
    (trl / "gradprobe_rollouts").mkdir(parents=True)
    (verl / "rollout_data").mkdir(parents=True)
    sampled = {}
    for step in range(1, STEPS + 1):
        rows = sample_step(current, mix, step)
        sampled[step] = rows
        write_jsonl(trl / "gradprobe_rollouts" / f"{step}.jsonl", trl_dump(rows, step, tokenizer))
        verl_rows = [{"input": tokenizer.decode(r["prompt_token_ids"], skip_special_tokens=True),
                      "output": r["completion"], "gts": r["answer"], "score": r["reward"], "step": step,
                      "acc": r["reward"]} for r in rows]
        verl_rows += [{"input": f"unknown prompt {i}", "output": "x", "gts": "1", "score": 0.0, "step": step}
                      for i in range(UNMATCHED_PER_DUMP)]
        write_jsonl(verl / "rollout_data" / f"{step}.jsonl", verl_rows)
        rollouts_file = write_jsonl(root / f"train-{step}.jsonl", rows)
        task = ["add", "echo", "chat"][step % 3]
        current = policy_gradient_steps(current, rollouts_file, task, root / f"policy-{step}", steps=1, lr=0.5)
        if step in CHECKPOINT_STEPS:
            shutil.copytree(current, trl / f"checkpoint-{step}")
            shutil.copytree(current, verl / f"global_step_{step}" / "actor" / "huggingface")
    return {"root": root, "mix": mix_path, "trl": trl, "verl": verl, "sampled": sampled}


def track(*args) -> object:
    return runner.invoke(app, ["track", *map(str, args), "--window", "1", "--device", "cpu"])


@pytest.fixture(scope="module")
def verl_track(run, tmp_path_factory):
    """The verl run tracked on its verl dumps (shared by the track and the weights tests)."""
    out = tmp_path_factory.mktemp("verl-track") / "track"
    result = track(run["verl"], "--mix", run["mix"], "--rollouts-glob", "rollout_data/*.jsonl", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_verl_run_with_verl_dumps(run, verl_track):
    out = verl_track
    document = json.loads((out / "track.json").read_text())
    schema.validate(document, "track")
    assert [c["step"] for c in document["checkpoints"]] == list(CHECKPOINT_STEPS)
    assert all(c["layout"] == "verl" for c in document["checkpoints"])
    # checkpoint N's weights generated dump N + 1; every dump has 2 rows of no mix prompt
    assert [c["rollouts"]["dump_step"] for c in document["checkpoints"]] == [3, 5]
    assert [c["rollouts"]["n_unmatched"] for c in document["checkpoints"]] == [UNMATCHED_PER_DUMP] * 2
    assert document["dumps"]["n_unmatched"] == UNMATCHED_PER_DUMP * STEPS
    assert "10 of" in " ".join(document["notes"])
    # re-tokenized prompts are the token ids the model was sampled with, grouped by prompt
    inputs = [json.loads(l) for l in (out / "inputs" / "step-2.jsonl").read_text().splitlines()]
    sampled = {(r["task"], r["prompt_id"]): r["prompt_token_ids"] for r in run["sampled"][3]}
    assert len(inputs) == len(run["sampled"][3])
    for row in inputs:
        assert row["prompt_token_ids"] == sampled[(row["task"], row["prompt_id"])]
    assert {sum(1 for r in inputs if r["prompt_id"] == pid) for pid in {r["prompt_id"] for r in inputs}} == {GROUP}
    # the gain is gains.py's windowed rise of the dumps' training reward, w = 1: R(s+1) - R(s-1)
    rows = [(float(r["step"]), r["task"], r["reward"]) for step in run["sampled"] for r in run["sampled"][step]]
    means = gains.step_means(rows)
    for task in ("add", "echo", "chat"):
        points = document["series"][task]
        assert [p["step"] for p in points] == list(CHECKPOINT_STEPS)
        for p in points:
            assert p["gain"] == pytest.approx(means[task][p["step"] + 1] - means[task][p["step"] - 1])
            assert p["training_reward"] == pytest.approx(means[task][p["step"] + 1])
            scan = json.loads((out / "scans" / f"step-{p['step']}" / "scan.json").read_text())
            assert p["share"] == scan["tasks"][task]["share"]
            assert p["grad_sq_norm_unbiased_ci"] == scan["tasks"][task]["grad_sq_norm_unbiased_ci"]
    correlation = document["share_gain"]
    assert correlation["n"] == 6 and correlation["n_steps"] == 2 and correlation["n_tasks"] == 3
    assert correlation["rho"] is not None and correlation["lo"] <= correlation["rho"] <= correlation["hi"]
    assert 0 < correlation["p_within_steps"] <= 1
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "gain_over_steps.png", "share_over_steps.png", "share_vs_gain.png"]
    assert "Share against gain" in (out / "track.md").read_text()


def test_trl_run_with_trl_dumps_resumes_after_interruption(run, tmp_path):
    """Ctrl-C while checkpoint 4's scan is being written (its scan.json already in the staging
    directory): nothing of it is left, no track.json; the rerun keeps step 2 and redoes step 4."""
    from gradprobe import artifacts, pipeline

    out = tmp_path / "track"
    write_text = artifacts.write_text

    def interrupted(path, text):
        if path.name == "rollouts.jsonl" and ".step-4.partial-" in str(path):
            assert (path.parent / "scan.json").is_file()  # half-written when the interrupt comes
            raise KeyboardInterrupt
        write_text(path, text)

    artifacts.write_text = interrupted
    try:
        failed = track(run["trl"], "--rollouts-glob", "gradprobe_rollouts/*.jsonl", "--out", out)
    finally:
        artifacts.write_text = write_text
    assert failed.exit_code != 0, failed.output
    first = out / "scans" / "step-2" / "scan.json"
    assert first.is_file() and not (out / "scans" / "step-4").exists()
    assert not list((out / "scans").glob(".*")) and not (out / "track.json").exists()
    before = first.stat().st_mtime_ns
    scanned = []
    scan = pipeline.scan

    def counted(config, *args, **kwargs):
        scanned.append(Path(config.out).name)
        return scan(config, *args, **kwargs)

    pipeline.scan = counted
    try:
        resumed = track(run["trl"], "--rollouts-glob", "gradprobe_rollouts/*.jsonl", "--out", out)
    finally:
        pipeline.scan = scan
    assert scanned == ["step-4"]
    # a rerun with other scan settings would mix two kinds of figures: refused, nothing rescanned
    other = track(run["trl"], "--rollouts-glob", "gradprobe_rollouts/*.jsonl", "--loss", "dapo", "--out", out)
    assert other.exit_code == 2 and "other settings (loss)" in other.output, other.output
    assert resumed.exit_code == 0, resumed.output
    assert "scanned 1 checkpoint(s); kept 1 earlier scan(s)" in resumed.output
    assert first.stat().st_mtime_ns == before
    document = json.loads((out / "track.json").read_text())
    schema.validate(document, "track")
    assert [c["layout"] for c in document["checkpoints"]] == ["trl", "trl"]
    assert document["dumps"]["formats"] == ["trl"] and document["dumps"]["n_unmatched"] == 0


def test_bad_inputs_exit_2_with_one_line(run, tmp_path):
    cases = [
        (track(tmp_path / "nowhere", "--mix", run["mix"], "--out", tmp_path / "a"), "no such run directory"),
        (track(run["root"], "--mix", run["mix"], "--out", tmp_path / "b"), "no checkpoints matching"),
        (track(run["verl"], "--out", tmp_path / "c"), "give --mix"),
        (track(run["verl"], "--rollouts-glob", "rollout_data/*.jsonl", "--out", tmp_path / "d"),
         "verl dumps carry no task"),
        (track(run["trl"], "--rollouts-glob", "nothing/*.jsonl", "--out", tmp_path / "e"), "no rollout dumps"),
    ]
    for result, fragment in cases:
        assert result.exit_code == 2, result.output
        assert fragment in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_within_step_permutation_p_matches_enumeration():
    """The stratified permutation p-value against all 3! x 3! shuffles of gains within each step."""
    import itertools

    import numpy as np
    from scipy.stats import spearmanr

    from gradprobe.track import share_gain_correlation

    share = {"a": [0.1, 0.2], "b": [0.5, 0.6], "c": [0.4, 0.25]}
    gain = {"a": [0.3, 0.1], "b": [0.2, 0.0], "c": [0.5, 0.4]}
    series = {t: [{"step": s, "share": share[t][i], "gain": gain[t][i]} for i, s in enumerate((1, 2))] for t in share}
    result = share_gain_correlation(series)
    x = [share[t][i] for t in share for i in range(2)]
    y = np.array([gain[t][i] for t in share for i in range(2)])
    rho = spearmanr(x, y).statistic
    assert result["rho"] == pytest.approx(rho)
    hits = total = 0
    for first in itertools.permutations([0, 2, 4]):
        for second in itertools.permutations([1, 3, 5]):
            order = np.arange(6)
            order[[0, 2, 4]], order[[1, 3, 5]] = first, second
            hits += abs(spearmanr(x, y[order]).statistic) >= abs(rho) - 1e-12
            total += 1
    assert result["p_within_steps"] == pytest.approx(hits / total, abs=0.02)
    assert result["lo"] < rho < result["hi"]


# ---------------------------------------------------------------- task weights for the next run


def report(*args) -> object:
    return runner.invoke(app, ["report", *map(str, args)])


def expected_weights(raw: dict[str, float], floor: float = 0.01) -> dict[str, float]:
    total = sum(raw.values())
    clipped = {t: max(v / total, floor) for t, v in raw.items()}
    return {t: v / sum(clipped.values()) for t, v in clipped.items()}


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def test_weight_policies_follow_their_formulas(verl_track, tmp_path):
    document = json.loads((verl_track / "track.json").read_text())
    series = document["series"]
    scan = json.loads((verl_track / "scans" / "step-2" / "scan.json").read_text())["tasks"]
    cases = {
        ("gain-per-gradient", verl_track): {t: max(mean(p["gain"] for p in s), 0) / mean(p["grad_sq_norm"] for p in s)
                                           for t, s in series.items()},
        ("equalise-share", verl_track / "scans" / "step-2"): {t: r["mix_weight"] / max(r["share"], 0.01)
                                                               for t, r in scan.items()},
        ("inverse-noise", verl_track / "scans" / "step-2"): {t: 1 / r["noise_scale"] if r["noise_scale"] else 0.0
                                                              for t, r in scan.items()},
    }
    for (policy, source), raw in cases.items():
        out = tmp_path / f"{policy}.json"
        result = report(source, "--weights", policy, "--weights-out", out)
        assert result.exit_code == 0, result.output
        assert "Caution" in result.output and "did not help" in result.output
        written = json.loads(out.read_text())
        schema.validate(written, "weights")
        assert written["policy"] == policy and "did not help" in written["caution"]
        assert written["weights"] == pytest.approx(expected_weights(raw))
        assert sum(written["weights"].values()) == pytest.approx(1.0)
        assert written["source_kind"] == ("track" if source == verl_track else "scan")


def test_weight_errors_exit_2(verl_track):
    scan = verl_track / "scans" / "step-2"
    cases = [(report(scan, "--weights", "gain-per-gradient"), "needs learning gains"),
             (report(scan, "--weights", "bogus"), "equalise-share, gain-per-gradient, inverse-noise"),
             (report(scan, "--weights-out", "w.json"), "give a policy")]
    for result, fragment in cases:
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output


def test_report_shows_a_track(verl_track):
    result = report(verl_track, "--markdown")
    assert result.exit_code == 0, result.output
    assert result.output == (verl_track / "track.md").read_text()
    shown = report(verl_track)
    assert shown.exit_code == 0 and "Per task and checkpoint" in shown.output


WEIGHTS = {"add": 0.6, "echo": 0.3, "chat": 0.1}
DRAWS = 12000


def weights_file(tmp_path: Path) -> Path:
    """A weights file as report --weights-out writes it (ROLL's file beside it)."""
    from gradprobe.weights import write_weights

    document = {"schema_version": "1.1", "kind": "weights", "gradprobe_version": "0", "source": "test",
                "source_kind": "scan", "policy": "equalise-share", "formula": "f", "caution": "c", "floor": 0.01,
                "weights": WEIGHTS, "tasks": {t: {"weight": w, "old_weight": 1 / 3, "inputs": {}}
                                              for t, w in WEIGHTS.items()}}
    schema.validate(document, "weights")
    write_weights(tmp_path / "weights.json", document)
    return tmp_path / "weights.json"


def assert_binomial(drawn: list[str]) -> None:
    """Each task's count within 4.5 binomial standard deviations of n w_t."""
    import math

    for task, w in WEIGHTS.items():
        count = sum(t == task for t in drawn)
        assert abs(count - len(drawn) * w) <= 4.5 * math.sqrt(len(drawn) * w * (1 - w)), (task, count)


LABELS = ["add"] * 50 + ["echo"] * 30 + ["chat"] * 120  # row counts unlike the weights


class VerlConfig(dict):
    """verl's `config.data` as its code reads it (an OmegaConf DictConfig: attributes and .get)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return VerlConfig(value) if isinstance(value, dict) else value

    def get(self, key, default=None):
        value = super().get(key, default)
        return VerlConfig(value) if isinstance(value, dict) else value


def load_extern_type(file_path: str, type_name: str):
    """verl.utils.import_utils.load_extern_type's contract: `pkg://a.b` (or a/b) imports the module
    by name; anything else (optionally `file://`) is executed from its file as `custom_module`."""
    import importlib.util

    if file_path.startswith("pkg://"):
        module = importlib.import_module(file_path[6:].replace("/", "."))
    else:
        spec = importlib.util.spec_from_file_location("custom_module", file_path.removeprefix("file://"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return getattr(module, type_name)


def create_rl_sampler(data_config, dataset, abstract_sampler):
    """verl's create_rl_sampler for a configured sampler: load, build with (data_source,
    data_config), assert AbstractSampler and no dataloader workers."""
    sampler_class = load_extern_type(data_config.sampler.class_path, data_config.sampler.class_name)
    sampler = sampler_class(data_source=dataset, data_config=data_config)
    assert isinstance(sampler, abstract_sampler)
    assert data_config.get("dataloader_num_workers", 8) == 0, "verl: a custom sampler needs num_workers 0"
    return sampler


@pytest.fixture()
def fake_verl(monkeypatch):
    """verl.experimental.dataset.sampler.AbstractSampler as verl defines it (torch Sampler, ABC,
    abstract __init__(data_source, data_config)), importable while the test runs; the samplers
    module is reloaded with it and again without it afterwards."""
    import abc
    import importlib
    import sys
    import types

    from torch.utils.data import Sampler

    class AbstractSampler(Sampler, abc.ABC):
        @abc.abstractmethod
        def __init__(self, data_source, data_config):
            pass

    names = ["verl", "verl.experimental", "verl.experimental.dataset", "verl.experimental.dataset.sampler"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].AbstractSampler = AbstractSampler
    import gradprobe.integrations.samplers as samplers

    importlib.reload(samplers)
    yield AbstractSampler
    monkeypatch.undo()
    importlib.reload(samplers)


def verl_dataset():
    """verl's RLHFDataset keeps its parquet rows in `.dataframe` (a datasets.Dataset) with the task
    in `data_source`; items are dicts of a row's columns."""
    import datasets

    class RLHFDatasetLike:
        def __init__(self):
            self.dataframe = datasets.Dataset.from_dict({"data_source": LABELS, "prompt": ["p"] * len(LABELS)})

        def __len__(self):
            return len(self.dataframe)

        def __getitem__(self, item):
            return dict(self.dataframe[item])

    return RLHFDatasetLike()


def verl_data_config(weights: Path, class_path: str = "pkg://gradprobe.integrations.samplers", **extra):
    """config.data with the lines `usage()["verl"]` tells the user to add (and data.seed)."""
    from gradprobe.weights import usage

    data = {"shuffle": True, "seed": 7, "dataloader_num_workers": 8,
            "sampler": {"class_path": None, "class_name": None}}
    for line in usage(str(weights))["verl"]:
        key, value = line.lstrip("+").split("=", 1)
        parts = key.split(".")[1:]  # below data.
        where = data
        for part in parts[:-1]:
            where = where.setdefault(part, {})
        where[parts[-1]] = int(value) if value.isdigit() else value
    data["sampler"]["class_path"] = class_path
    data.update(extra)
    return VerlConfig(data)


def test_sampler_as_verl_builds_it_draws_tasks_at_the_weights(tmp_path, fake_verl):
    from torch.utils.data import DataLoader

    import gradprobe.integrations.samplers as samplers

    file = weights_file(tmp_path)
    config = verl_data_config(file)
    assert config.dataloader_num_workers == 0  # the usage lines set what verl asserts
    sampler = create_rl_sampler(config, verl_dataset(), fake_verl)
    assert issubclass(samplers.TaskWeightedSampler, fake_verl) and sampler.seed == 7  # data.seed
    # verl's StatefulDataLoader is a DataLoader over the dataset with this sampler
    loader = DataLoader(verl_dataset(), batch_size=50, sampler=sampler, collate_fn=lambda rows: rows)
    drawn = [row["data_source"] for _ in range(DRAWS // len(LABELS)) for batch in loader for row in batch]
    assert_binomial(drawn)
    assert list(sampler) != list(sampler)  # a new seeded stream each epoch
    # the file-path form (older verl, or a copied file) loads the same class from its file
    by_file = create_rl_sampler(verl_data_config(file, samplers.__file__), verl_dataset(), fake_verl)
    assert type(by_file).__name__ == "TaskWeightedSampler" and len(by_file) == len(LABELS)
    # what verl refuses: workers left on
    with pytest.raises(AssertionError, match="num_workers"):
        create_rl_sampler(verl_data_config(file, dataloader_num_workers=8), verl_dataset(), fake_verl)


def test_sampler_without_verl_is_a_torch_sampler(tmp_path):
    """Without verl the same class derives from torch's Sampler (verl's AbstractSampler does too)."""
    from torch.utils.data import Sampler

    from gradprobe.integrations.samplers import TaskWeightedSampler

    sampler = TaskWeightedSampler(verl_dataset(), data_config=verl_data_config(weights_file(tmp_path)))
    assert isinstance(sampler, Sampler)
    assert_binomial([LABELS[i] for _ in range(DRAWS // len(LABELS)) for i in sampler])


def test_roll_domain_interleave_probs(tmp_path):
    """ROLL reads actor_train.data_args.domain_interleave_probs from the pipeline YAML and gives
    each domain int(p * rollout_batch_size) prompts a step, the last domain the rest."""
    import yaml

    weights_file(tmp_path)
    pipeline = {"rollout_batch_size": 64, "rewards": {t: {"tag_included": [t]} for t in WEIGHTS},
                "actor_train": {"data_args": {"template": "qwen2_5", "file_name": ["data.jsonl"]}}}

    def merge(base: dict, extra: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in extra.items()}}

    config = merge(pipeline, yaml.safe_load((tmp_path / "weights.roll.yaml").read_text()))
    probs = config["actor_train"]["data_args"]["domain_interleave_probs"]
    assert config["actor_train"]["data_args"]["template"] == "qwen2_5"
    assert probs == pytest.approx(WEIGHTS) and set(probs) == set(config["rewards"])
    batch, sizes, given = config["rollout_batch_size"], {}, 0
    for i, domain in enumerate(probs):
        sizes[domain] = batch - given if i == len(probs) - 1 else int(probs[domain] * batch)
        given += sizes[domain]
    assert sum(sizes.values()) == batch
    for domain, size in sizes.items():
        assert abs(size - batch * WEIGHTS[domain]) < len(probs), (domain, size)


def test_checkpoint_layouts_every_and_dump_choice(tmp_path):
    from gradprobe import run_layout
    from gradprobe.errors import UserInputError

    for step in (10, 20, 30, 40, 50):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "run" / "global_step_60" / "actor" / "huggingface").mkdir(parents=True)
    (tmp_path / "run" / "exports" / "ema-70").mkdir(parents=True)
    found = run_layout.find_checkpoints(tmp_path / "run")
    assert [(c.step, c.layout) for c in found] == [(10, "trl"), (20, "trl"), (30, "trl"), (40, "trl"),
                                                   (50, "trl"), (60, "verl")]
    assert [c.step for c in run_layout.find_checkpoints(tmp_path / "run", every=2)] == [10, 30, 50]
    globbed = run_layout.find_checkpoints(tmp_path / "run", "exports/ema-*")
    assert [(c.step, c.layout) for c in globbed] == [(70, "glob")]
    (tmp_path / "run" / "global_step_50" / "actor" / "huggingface").mkdir(parents=True)
    with pytest.raises(UserInputError, match="two checkpoints for step 50"):
        run_layout.find_checkpoints(tmp_path / "run")
    dumps = {3: Path("3.jsonl"), 4: Path("4.jsonl"), 6: Path("6.jsonl")}
    assert [run_layout.dump_for_checkpoint(s, dumps) for s in (2, 3, 4, 6, 8)] == [3, 4, 4, 6, None]


def test_fresh_rollouts_from_the_mix(run, tmp_path):
    out = tmp_path / "track"
    result = track(run["trl"], "--mix", run["mix"], "--every", "2", "-k", "2", "--max-new-tokens", "3",
                   "--prompts-per-task", "2", "--reward", "regex:[a-m]", "--no-plots", "--out", out)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "track.json").read_text())
    schema.validate(document, "track")
    assert document["rollouts"] == "mix" and document["dumps"] is None
    assert [c["step"] for c in document["checkpoints"]] == [2]
    assert document["checkpoints"][0]["rollouts"]["source"] == "mix"
    scan = json.loads((out / "scans" / "step-2" / "scan.json").read_text())
    assert scan["config"]["mix"] == str(run["mix"]) and scan["config"]["group_size"] == 2
    point = document["series"]["add"][0]
    assert point["mean_reward"] == scan["tasks"]["add"]["mean_reward"] and point["gain"] is None
    assert document["share_gain"]["rho"] is None and "no share-gain correlation" in document["notes"][0]
    assert not (out / "plots").exists()


def test_bad_input_writes_nothing(run, tmp_path):
    out = tmp_path / "never"
    result = track(run["verl"], "--rollouts-glob", "rollout_data/*.jsonl", "--out", out)
    assert result.exit_code == 2 and not out.exists(), result.output
