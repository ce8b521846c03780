"""Task sampling weights for the next run, from a scan or a track (`report --weights POLICY`).

Each policy maps per-task figures to raw weights r_t; the weights are then
    w_t = r_t / sum_s r_s,   then   w_t <- max(w_t, FLOOR), renormalised to sum to 1,
so that no task leaves the mix. From a track, a task's figures are their means over the
checkpoints (the gain over the checkpoints that have one). Policies (the registry POLICIES; add
one with `@POLICIES.register(name)` on a `WeightPolicy`):

- equalise-share:    r_t = w_t_old / max(share_t, FLOOR)   (one fixed-point step towards equal
                     shares of the mixed update; share_t = w_t <g_t, g> / ||g||^2)
- gain-per-gradient: r_t = max(gain_t, 0) / ||g_t||^2      (learning gain per unit of squared
                     gradient; needs a track, whose gains come from the training reward)
- inverse-noise:     r_t = 1 / B_t, B_t = tr(Sigma_t) / ||E u_t||^2 (the noise scale; r_t = 0
                     where the unbiased ||E u_t||^2 <= 0, noise only)

Every policy carries the study's caution (CAUTION): sampling tasks in proportion to their
gradients did not help.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import gradprobe
from gradprobe import artifacts
from gradprobe.errors import UserInputError
from gradprobe.registry import Registry

FLOOR = 0.01
CAUTION = ("Caution: the study behind gradprobe found that sampling tasks in proportion to their gradients "
           "did not help; the tasks with the largest gradients were not the ones that learned most. These "
           "weights are an experiment to run against the current mix, not a prescription.")
FIGURES = ("old_weight", "share", "grad_sq_norm", "gain", "noise_scale")


@dataclass(frozen=True)
class TaskFigures:
    """What the policies read of one task (None where the source has no value)."""

    old_weight: float
    share: float | None
    grad_sq_norm: float | None
    gain: float | None
    noise_scale: float | None


@dataclass(frozen=True)
class WeightPolicy:
    """A named rule from task figures to raw weights, with its formula for the reader."""

    formula: str
    raw: Callable[[dict[str, TaskFigures]], dict[str, float]]


POLICIES: Registry[WeightPolicy] = Registry("weight policy")


def _require(figures: dict[str, TaskFigures], name: str, why: str) -> None:
    lacking = [t for t, f in figures.items() if getattr(f, name) is None]
    if len(lacking) == len(figures):
        raise UserInputError(f"no task has a {name}: {why}")


def equalise_share(figures: dict[str, TaskFigures]) -> dict[str, float]:
    """r_t = w_t_old / max(share_t, FLOOR)."""
    _require(figures, "share", "the scan has no shares")
    return {t: f.old_weight / max(f.share if f.share is not None else FLOOR, FLOOR) for t, f in figures.items()}


def gain_per_gradient(figures: dict[str, TaskFigures]) -> dict[str, float]:
    """r_t = max(gain_t, 0) / ||g_t||^2 (0 without a gain or a gradient)."""
    _require(figures, "gain", "this policy needs learning gains: give a track directory (gradprobe track), "
                              "not a single scan")
    raw = {t: max(f.gain, 0.0) / f.grad_sq_norm if f.gain is not None and f.grad_sq_norm else 0.0
           for t, f in figures.items()}
    if not any(v > 0 for v in raw.values()):
        raise UserInputError("no task has a positive learning gain: gain-per-gradient has nothing to weight by")
    return raw


def inverse_noise(figures: dict[str, TaskFigures]) -> dict[str, float]:
    """r_t = 1 / B_t (0 where the noise scale is undefined: the unbiased ||E u_t||^2 <= 0)."""
    raw = {t: 1.0 / f.noise_scale if f.noise_scale and f.noise_scale > 0 else 0.0 for t, f in figures.items()}
    if not any(v > 0 for v in raw.values()):
        raise UserInputError("no task has a noise scale (every unbiased squared norm <= 0): use more prompts")
    return raw


POLICIES.register("equalise-share")(WeightPolicy(
    "r_t = w_t_old / max(share_t, 0.01); share_t = w_t <g_t, g> / ||g||^2", equalise_share))
POLICIES.register("gain-per-gradient")(WeightPolicy(
    "r_t = max(gain_t, 0) / ||g_t||^2; gain_t the windowed rise of the training reward", gain_per_gradient))
POLICIES.register("inverse-noise")(WeightPolicy(
    "r_t = 1 / B_t; B_t = tr(Sigma_t) / ||E u_t||^2 (noise scale, unbiased ||E u_t||^2)", inverse_noise))


def normalise(raw: dict[str, float], floor: float = FLOOR) -> dict[str, float]:
    """w_t = r_t / sum r, then max(w_t, floor), renormalised to sum to 1."""
    total = sum(raw.values())
    if not total > 0:
        raise UserInputError("every raw weight is zero")
    clipped = {t: max(v / total, floor) for t, v in raw.items()}
    total = sum(clipped.values())
    return {t: v / total for t, v in clipped.items()}


def _mean(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


def scan_figures(document: dict[str, Any]) -> dict[str, TaskFigures]:
    """A scan's per-task figures (no gains: a scan has no training reward over steps)."""
    return {t: TaskFigures(row.get("mix_weight", 1.0), row.get("share"), row.get("grad_sq_norm"), None,
                           row.get("noise_scale")) for t, row in document["tasks"].items()}


def track_figures(document: dict[str, Any]) -> dict[str, TaskFigures]:
    """A track's per-task figures: means over its checkpoints; the latest mix weight."""
    out = {}
    for task in document["tasks"]:
        points = document["series"][task]
        out[task] = TaskFigures(points[-1]["mix_weight"], _mean([p["share"] for p in points]),
                                _mean([p["grad_sq_norm"] for p in points]), _mean([p["gain"] for p in points]),
                                _mean([p["noise_scale"] for p in points]))
    return out


def weights_document(document: dict[str, Any], policy_name: str, source: str) -> dict[str, Any]:
    """The weights JSON (schema gradprobe/schema/weights.schema.json) of a scan or track document."""
    policy = POLICIES.get(policy_name)
    kind = "track" if document.get("kind") == "track" else "scan"
    figures = track_figures(document) if kind == "track" else scan_figures(document)
    weights = normalise(policy.raw(figures))
    old_total = sum(f.old_weight for f in figures.values())
    return {
        "schema_version": artifacts.SCHEMA_VERSION,
        "kind": "weights",
        "gradprobe_version": gradprobe.__version__,
        "source": source,
        "source_kind": kind,
        "policy": policy_name,
        "formula": f"{policy.formula}; w_t = r_t / sum r, then max(w_t, {FLOOR}) renormalised",
        "caution": CAUTION,
        "floor": FLOOR,
        "weights": weights,
        "tasks": {t: {"weight": weights[t], "old_weight": f.old_weight / old_total,
                      "inputs": {k: getattr(f, k) for k in FIGURES[1:]}} for t, f in figures.items()},
        "usage": usage(),
    }


def usage(weights_file: str = "WEIGHTS.json") -> dict[str, Any]:
    """How each trainer takes the weights (also in README, "Task weights for the next run")."""
    return {
        "trl": ("subclass GRPOTrainer: def _get_train_sampler(self, dataset=None): return "
                f"TaskWeightedSampler.for_grpo(self, dataset, weights_file='{weights_file}', task_key='task')"),
        "verl": ["data.sampler.class_path=pkg://gradprobe.integrations.samplers",
                 "data.sampler.class_name=TaskWeightedSampler",
                 f"+data.sampler.weights_file={weights_file}",
                 "data.dataloader_num_workers=0"],
        "roll": ("actor_train.data_args.domain_interleave_probs in the pipeline YAML: merge the "
                 f"{roll_path(Path(weights_file)).name} file beside the JSON (task names must be ROLL's domains)"),
    }


def roll_path(path: Path) -> Path:
    """The ROLL file beside a weights JSON: weights.json -> weights.roll.yaml."""
    return path.with_name(path.stem + ".roll.yaml")


def write_weights(path: Path, document: dict[str, Any]) -> list[Path]:
    """FILE (the weights JSON) and FILE's .roll.yaml, atomically: ROLL reads the mapping at
    `actor_train.data_args.domain_interleave_probs` of its pipeline config (RLVRConfig)."""
    import yaml

    path = Path(path)
    if not path.parent.resolve().is_dir():
        raise UserInputError(f"--weights-out {path}: the directory {path.parent} does not exist")
    document = {**document, "usage": usage(str(path))}
    artifacts.write_json(path, document)
    roll = roll_path(path)
    nested = {"actor_train": {"data_args": {"domain_interleave_probs": document["weights"]}}}
    text = yaml.safe_dump(nested, sort_keys=False)
    # ROLL gives each domain int(p * rollout_batch_size) prompts a step (the last domain the rest)
    artifacts.write_text(roll, f"# ROLL: domain sampling probabilities from gradprobe (policy {document['policy']});\n"
                               f"# merge into the RLVR pipeline YAML; the names must be the domains of its rewards\n{text}")
    return [path, roll]


def read_weights(path: str | Path) -> dict[str, float]:
    """The task -> weight mapping of a weights JSON written by `report --weights-out`."""
    import json

    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("kind") != "weights":
        raise ValueError(f"{path}: not a gradprobe weights file (report --weights-out)")
    return {str(t): float(w) for t, w in document["weights"].items()}
