"""`gradprobe track`: the study's analysis over a whole training run.

checkpoints (run_layout) -> per checkpoint, its rollouts (the trainer's dump for that step, or
fresh ones from MIX) -> one scan each (pipeline.scan, kept in DIR/scans/step-N and never redone)
-> the time series per task and step (share, norms, the U-statistic and its interval, rewards,
the windowed learning gain from the training reward over steps) -> the correlation of share and
gain across tasks and steps -> DIR/track.json (schema gradprobe/schema/track.schema.json),
DIR/track.md and, with matplotlib, DIR/plots/.

The gain is gains.py's windowed rise in training reward,
    gain_t(s) = mean(R_t over steps s+1..s+w) - mean(R_t over steps s-w..s-1),
with R_t(s) the mean reward of task t's rows in the dump of step s (all dumps, not only the
checkpoints'), or, without dumps, the scans' mean rewards at the checkpoint steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import gradprobe
from gradprobe import artifacts, dumps, gains, run_layout
from gradprobe.errors import UserInputError
from gradprobe.pipeline import Progress, ScanConfig, SilentProgress

TRACK_FILE = "track.json"
TRACK_MARKDOWN = "track.md"
SCANS_DIR = "scans"
INPUTS_DIR = "inputs"
PERMUTATIONS = 9999
PERMUTATION_SEED = 0


@dataclass
class TrackConfig:
    """Every setting of a track; `scan` holds the ScanConfig fields every checkpoint's scan shares."""

    run_dir: str
    out: str
    mix: str | None = None
    rollouts_glob: str | None = None
    checkpoints_glob: str | None = None
    every: int = 1
    window: int = gains.DEFAULT_WINDOW
    plots: bool = True
    scan: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointInput:
    """What one checkpoint is scanned on: a dump (its step, file, format and row counts) or MIX."""

    source: str
    dump_step: int | None = None
    dump_file: str | None = None
    format: str | None = None
    n_rows: int | None = None
    n_unmatched: int | None = None
    n_ambiguous: int | None = None


@dataclass
class TrackResult:
    document: dict[str, Any]
    out: Path
    scanned: list[int]
    reused: list[int]
    plots: list[Path] | str = field(default_factory=list)
    """The pictures written, or why none were."""


@dataclass
class TrackInputs:
    """Everything read and checked before anything is written: the checkpoints, the dumps by step,
    the mix index verl rows are matched with, and each checkpoint's rollouts (rows when a dump)."""

    checkpoints: list[run_layout.Checkpoint]
    read: dict[int, dumps.Dump]
    index: dumps.MixIndex | None
    inputs: dict[int, CheckpointInput]
    rollouts: dict[int, list[dict[str, Any]]]


def track(config: TrackConfig, progress: Progress | None = None) -> TrackResult:
    """Scan every selected checkpoint of a run (resuming), then write the time series."""
    progress = progress or SilentProgress()
    given = read_inputs(config)
    out = _prepare_out(Path(config.out))
    for step, rows in given.rollouts.items():
        dumps.write_rollouts(out / INPUTS_DIR / f"step-{step}.jsonl", rows)
    scanned, reused = [], []
    with progress.stage("checkpoints", len(given.checkpoints)) as advance:
        for checkpoint in given.checkpoints:
            scan_dir = out / SCANS_DIR / f"step-{checkpoint.step}"
            if _finished(scan_dir, checkpoint, given.inputs[checkpoint.step], config.scan):
                reused.append(checkpoint.step)
            else:
                _scan_checkpoint(config, checkpoint, given.inputs[checkpoint.step], out, scan_dir)
                scanned.append(checkpoint.step)
            advance(1)
    scans = {c.step: artifacts.read_scan(out / SCANS_DIR / f"step-{c.step}") for c in given.checkpoints}
    rows, unmatched = _training_rewards(given.read, given.index, scans)
    document = track_document(config, given.checkpoints, given.inputs, scans, rows, unmatched, given.read)
    artifacts.write_json(out / TRACK_FILE, document)
    from gradprobe.views.track_view import track_markdown

    artifacts.write_text(out / TRACK_MARKDOWN, track_markdown(document))
    pictures = _write_plots(out, document) if config.plots else []
    return TrackResult(document, out, scanned, reused, pictures)


def read_inputs(config: TrackConfig) -> TrackInputs:
    """Find the checkpoints and dumps, read the mix and convert each checkpoint's dump; writes nothing."""
    from gradprobe.model_loading import load_tokenizer

    if config.window < 1:
        raise UserInputError("--window must be at least 1 step")
    checkpoints = run_layout.find_checkpoints(Path(config.run_dir), config.checkpoints_glob, config.every)
    found = run_layout.find_dumps(Path(config.run_dir), config.rollouts_glob) if config.rollouts_glob else {}
    if not found and config.mix is None:
        raise UserInputError("give --mix to sample fresh rollouts, or --rollouts-glob for the run's dumps")
    mix = _load_mix(config) if config.mix else None
    read = {step: dumps.read_dump(path) for step, path in found.items()}
    tokenizer = load_tokenizer(str(checkpoints[0].path), config.scan.get("trust_remote_code", False)) if read else None
    index = dumps.MixIndex(mix, tokenizer) if mix is not None and any(d.format == "verl" for d in read.values()) else None
    inputs, rollouts = {}, {}
    for checkpoint in checkpoints:
        inputs[checkpoint.step], converted = _checkpoint_input(checkpoint, read, index, tokenizer, mix)
        if converted is not None:
            rollouts[checkpoint.step] = converted
    return TrackInputs(checkpoints, read, index, inputs, rollouts)


def _write_plots(out: Path, document: dict[str, Any]) -> list[Path] | str:
    """DIR/plots/*.png, or why there are none (matplotlib, the `plots` extra, is optional here)."""
    from gradprobe.views.plots import write_figures
    from gradprobe.views.track_view import track_figures

    try:
        return write_figures(out / "plots", track_figures(document))
    except UserInputError as exc:
        return str(exc)


def _prepare_out(out: Path) -> Path:
    """DIR, created if needed; an existing DIR must be an earlier track's (scans/ or track.json)."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not ((out / SCANS_DIR).is_dir() or (out / TRACK_FILE).is_file()):
        raise UserInputError(f"--out {out}: exists and is not a gradprobe track directory; choose another --out")
    try:
        (out / SCANS_DIR).mkdir(parents=True, exist_ok=True)
        (out / INPUTS_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create {out}: {exc.strerror}") from None
    return out


def _load_mix(config: TrackConfig) -> Any:
    from gradprobe.mix import load_mix

    scan = config.scan
    return load_mix(Path(config.mix), scan.get("task_field", "task"), scan.get("prompt_field", "prompt"),
                    scan.get("answer_field", "answer"), scan.get("split"))


def _checkpoint_input(checkpoint: run_layout.Checkpoint, read: dict[int, dumps.Dump], index: Any,
                      tokenizer: Any, mix: Any) -> tuple[CheckpointInput, list[dict[str, Any]] | None]:
    """The checkpoint's dump as rollout rows (for DIR/inputs/step-N.jsonl), or MIX without dumps."""
    if not read:
        return CheckpointInput("mix"), None
    dump_step = run_layout.dump_for_checkpoint(checkpoint.step, read)
    if dump_step is None:
        raise UserInputError(f"no rollout dump for checkpoint step {checkpoint.step} (looked for steps "
                             f"{checkpoint.step + 1} and {checkpoint.step}); dumps cover steps "
                             f"{min(read)}..{max(read)}")
    dump = read[dump_step]
    converted = dumps.convert_dump(dump, index, tokenizer, dump_step)
    if not converted.rollouts:
        raise UserInputError(f"{dump.path}: none of its {converted.n_rows} rows matched a row of --mix "
                             f"{mix.source if mix else ''}; is it the run's training data?")
    return CheckpointInput("dump", dump_step, str(dump.path), dump.format, converted.n_rows,
                           converted.n_unmatched, converted.n_ambiguous), converted.rollouts


def _scan_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The ScanConfig fields a track passes to every scan (not the per-checkpoint model, out, mix, rollouts)."""
    return {k: v for k, v in settings.items() if k in ScanConfig.__dataclass_fields__
            and k not in ("model", "out", "mix", "rollouts", "overwrite")}


def _finished(scan_dir: Path, checkpoint: run_layout.Checkpoint, given: CheckpointInput,
              settings: dict[str, Any]) -> bool:
    """Whether an earlier run already scanned this checkpoint on the same kind of rollouts (scans
    are written atomically, so a kept one is whole)."""
    if not (scan_dir / artifacts.SCAN_FILE).is_file():
        return False
    kept = artifacts.read_scan(scan_dir)
    # a kept scan made with other settings would mix two kinds of figures in one series
    changed = [k for k, v in _scan_settings(settings).items()
               if json.loads(json.dumps(v, default=str)) != kept["config"].get(k)]
    if changed:
        raise UserInputError(f"{scan_dir} was scanned with other settings ({', '.join(sorted(changed))}); "
                             "rerun with the same options, or use another --out")
    if Path(kept["config"]["model"]).resolve() != checkpoint.path.resolve():
        raise UserInputError(f"{scan_dir} was scanned from {kept['config']['model']}, not {checkpoint.path}; "
                             "use another --out for another run")
    kept_source = "mix" if kept["config"]["rollouts"] is None else "dump"
    if kept_source != given.source:
        raise UserInputError(f"{scan_dir} was scanned on {'fresh rollouts from the mix' if kept_source == 'mix' else 'a dump'}, "
                             f"this track scans {'dumps' if given.source == 'dump' else 'fresh rollouts'}; "
                             "use another --out")
    return True


def _scan_checkpoint(config: TrackConfig, checkpoint: run_layout.Checkpoint, given: CheckpointInput,
                     out: Path, scan_dir: Path) -> None:
    from gradprobe.pipeline import scan

    base = ScanConfig(model=str(checkpoint.path), out=str(scan_dir), **_scan_settings(config.scan))
    if given.source == "dump":
        base = replace(base, rollouts=str(out / INPUTS_DIR / f"step-{checkpoint.step}.jsonl"), mix=None)
    else:
        base = replace(base, mix=config.mix)
    try:
        scan(base)
    except UserInputError as exc:
        raise UserInputError(f"checkpoint step {checkpoint.step} ({checkpoint.path}): {exc}") from None


def _training_rewards(read: dict[int, dumps.Dump], index: Any,
                      scans: dict[int, dict[str, Any]]) -> tuple[list[tuple[float, str, float]], int]:
    """R rows for the gain: every dump's (step, task, reward), or the scans' task means by step."""
    if not read:
        return [(float(step), task, float(row["mean_reward"])) for step, doc in scans.items()
                for task, row in doc["tasks"].items()], 0
    rows, unmatched = [], 0
    for step, dump in sorted(read.items()):
        some, missed = dumps.reward_rows(dump, index, step)
        rows += some
        unmatched += missed
    return rows, unmatched


def task_series(scans: dict[int, dict[str, Any]], rows: list[tuple[float, str, float]], window: int,
                inputs: dict[int, CheckpointInput]) -> dict[str, list[dict[str, Any]]]:
    """Per task, one point per checkpoint step: the scan's gradient figures, its rewards, and the
    windowed gain of the training reward at that step (None without rewards on both sides)."""
    means = gains.step_means(rows)
    tasks = list(dict.fromkeys(t for doc in scans.values() for t in doc["tasks"]))
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    for step, doc in sorted(scans.items()):
        for task in tasks:
            row = doc["tasks"].get(task)
            if row is None:
                continue
            at = gains.windowed_gain(means.get(task, {}), float(step), window)
            dump_step = inputs[step].dump_step
            out[task].append({
                "step": step,
                "share": row["share"],
                "grad_norm": row["grad_norm"],
                "grad_sq_norm": row["grad_sq_norm"],
                "grad_sq_norm_unbiased": row["grad_sq_norm_unbiased"],
                "grad_sq_norm_unbiased_ci": row["grad_sq_norm_unbiased_ci"],
                "noise_scale": row["noise_scale"],
                "mix_weight": row["mix_weight"],
                "n_prompts": row["n_prompts"],
                "mean_reward": row["mean_reward"],
                "training_reward": None if dump_step is None else means.get(task, {}).get(float(dump_step)),
                "gain": at["gain"],
                "gain_before_mean": at["before_mean"],
                "gain_after_mean": at["after_mean"],
            })
    return out


def share_gain_correlation(series: dict[str, list[dict[str, Any]]], seed: int = PERMUTATION_SEED,
                           permutations: int = PERMUTATIONS) -> dict[str, Any]:
    """Spearman rho of share and gain over every (task, step) point that has both.

    rho, its Fisher-z 95% interval tanh(atanh(rho) -/+ 1.96 * 1.06 / sqrt(n - 3)) and scipy's
    p-value (gradprobe.stats.spearman_ci) treat the points as independent; the points of one
    step share a checkpoint, so `p_within_steps` also tests rho against shuffling the gains
    among the tasks of each step (a stratified permutation test, `permutations` seeded draws):
        p = (1 + #{|rho_perm| >= |rho|}) / (1 + permutations).
    """
    from gradprobe.stats import spearman_ci

    points = [(task, p["step"], p["share"], p["gain"]) for task, points in series.items() for p in points
              if p["share"] is not None and p["gain"] is not None]
    share = np.array([p[2] for p in points], dtype=float)
    gain = np.array([p[3] for p in points], dtype=float)
    result = spearman_ci(share, gain)
    result["p_within_steps"] = None
    if result["rho"] is not None:
        steps = np.array([p[1] for p in points])
        result["p_within_steps"] = _within_step_permutation_p(share, gain, steps, result["rho"], seed, permutations)
    result["n_steps"] = len({p[1] for p in points})
    result["n_tasks"] = len({p[0] for p in points})
    return result


def _within_step_permutation_p(share: np.ndarray, gain: np.ndarray, steps: np.ndarray, rho: float,
                               seed: int, permutations: int) -> float:
    """(1 + #{|rho_perm| >= |rho|}) / (1 + permutations), the gains shuffled among each step's tasks."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    shuffled = np.tile(gain, (permutations, 1))
    for step in np.unique(steps):
        where = np.flatnonzero(steps == step)
        shuffled[:, where] = rng.permuted(shuffled[:, where], axis=1)
    rx = rankdata(share)
    ry = rankdata(shuffled, axis=1)
    rx, ry = rx - rx.mean(), ry - ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho_perm = (ry @ rx) / (np.linalg.norm(ry, axis=1) * np.linalg.norm(rx))
    hits = int(np.sum(np.abs(np.nan_to_num(rho_perm)) >= abs(rho) - 1e-12))
    return (1 + hits) / (1 + permutations)


def track_document(config: TrackConfig, checkpoints: list[run_layout.Checkpoint],
                   inputs: dict[int, CheckpointInput], scans: dict[int, dict[str, Any]],
                   rows: list[tuple[float, str, float]], unmatched: int,
                   read: dict[int, dumps.Dump]) -> dict[str, Any]:
    """track.json: the run, each checkpoint's input, the per-task series and the correlation."""
    series = task_series(scans, rows, config.window, inputs)
    correlation = share_gain_correlation(series)
    return {
        "schema_version": artifacts.SCHEMA_VERSION,
        "kind": "track",
        "gradprobe_version": gradprobe.__version__,
        "run_dir": str(config.run_dir),
        "mix": config.mix,
        "rollouts": "dumps" if read else "mix",
        "dumps": None if not read else {
            "glob": config.rollouts_glob,
            "formats": sorted({d.format for d in read.values()}),
            "n_files": len(read),
            "steps": [min(read), max(read)],
            "n_rows": sum(len(d.rows) for d in read.values()),
            "n_unmatched": unmatched,
        },
        "window": config.window,
        "gain_formula": "gain_t(s) = mean(R_t over steps s+1..s+w) - mean(R_t over steps s-w..s-1)",
        "reward_source": "training reward in the dumps, every step" if read else
                         "the scans' mean reward at the checkpoint steps",
        "checkpoints": [{
            "step": c.step, "path": str(c.path), "layout": c.layout,
            "scan": f"{SCANS_DIR}/step-{c.step}",
            "rollouts": {k: v for k, v in vars(inputs[c.step]).items()},
            "verdict": scans[c.step].get("verdict"),
        } for c in checkpoints],
        "tasks": list(series),
        "series": series,
        "share_gain": correlation,
        "notes": _notes(correlation, unmatched, read),
    }


def _notes(correlation: dict[str, Any], unmatched: int, read: dict[int, dumps.Dump]) -> list[str]:
    notes = []
    if correlation["rho"] is None:
        notes.append(f"no share-gain correlation: {correlation.get('reason')} (n = {correlation['n']}); "
                     "more checkpoints, or a smaller --window so more steps have a gain")
    if unmatched:
        total = sum(len(d.rows) for d in read.values())
        notes.append(f"{unmatched} of {total} dump rows matched no row of --mix and were left out")
    return notes


def read_track(path: Path) -> dict[str, Any] | None:
    """track.json of a track directory (or the file itself); None when `path` is not a track."""
    import json

    path = Path(path)
    file = path / TRACK_FILE if path.is_dir() else path
    if not file.is_file() or (path.is_dir() and not (path / TRACK_FILE).is_file()):
        return None
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) and document.get("kind") == "track" else None
