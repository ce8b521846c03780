"""task_grads.safetensors: each task's gradient g_t, saved exactly or as a seeded projection.

A scan saves its task gradients so that `gradprobe compare` can measure their drift between two
checkpoints, cos(g_t under A, g_t under B) (docs/metrics.md, "Learning gains"). When the exact
gradients (T tasks x selected parameters, float32) fit in the size limit and on the disk they are
saved as they are, one tensor [T, *shape] per parameter name; otherwise as one tensor
``projection`` [T, dim], the seeded count sketch of `gradprobe.gradients.projection` (O(parameters)
per task, computed on the device where the sums are), whose cosines estimate the exact ones
within a stated error bound. Files written before the count sketch hold a Gaussian projection;
they are read as such.

The file's metadata (strings, as safetensors requires) says which: ``kind`` exact or projected;
for a projection ``projection`` (countsketch or gaussian; absent in the older files, which are
all gaussian), ``dim``, ``seed``, ``method`` and ``cosine_error_bound_95``; ``tasks`` and
``params`` (names and shapes) as JSON. Two files are comparable when kind, projection, dim, seed
and params agree.

A torchrun scan writes the same file from rank 0 whether its sums were replicated or sharded
(`--shard`): exact tensors are gathered from the shards one parameter at a time, a projection is
the sum of the ranks' sketches of their shards (`gradprobe.distributed.sharded.task_gradients`);
so `compare` reads one layout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradprobe.errors import UserInputError
from gradprobe.gradients import projection

DEFAULT_LIMIT_MB = 64.0
DISK_MARGIN_BYTES = 256 * 2**20
"""Free space the exact file must leave on the disk (the scan's other files, the filesystem)."""


@dataclass
class TaskGradients:
    """Task gradients as saved: exact per-parameter tensors, or the projection [T, dim]."""

    kind: str
    tasks: list[str]
    params: list[tuple[str, list[int]]]
    tensors: dict[str, torch.Tensor]
    dim: int | None = None
    seed: int | None = None
    projection: str | None = None
    """countsketch or gaussian, for kind projected."""
    reason: str | None = None
    """Why a projection was saved instead of the exact gradients."""

    @property
    def info(self) -> dict[str, Any]:
        """What scan.json records under `task_grads`."""
        n_parameters = sum(_numel(shape) for _, shape in self.params)
        out: dict[str, Any] = {"kind": self.kind, "tasks": self.tasks, "n_parameters": n_parameters,
                               "exact_mb": _exact_bytes(len(self.tasks), n_parameters) / 1e6}
        if self.kind == "projected":
            out.update(self.projection_info)
            if self.reason:
                out["reason"] = self.reason
        return out

    @property
    def projection_info(self) -> dict[str, Any]:
        """The projection's kind, dimension, seed, method and 95% error bound on cosines."""
        dim = self.dim or 1
        return {"projection": self.projection, "dim": dim, "seed": self.seed,
                "method": projection.METHODS[self.projection or projection.GAUSSIAN],
                "cosine_error_bound_95": projection.cosine_error_bound(dim)}

    def task_vector(self, task: str) -> torch.Tensor:
        """g_t (exact: flattened over parameters in `params` order) or S g_t, as one vector."""
        t = self.tasks.index(task)
        if self.kind == "projected":
            return self.tensors["projection"][t].double()
        return torch.cat([self.tensors[name][t].reshape(-1).double() for name, _ in self.params])


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _exact_bytes(n_tasks: int, n_parameters: int) -> int:
    return 4 * n_tasks * n_parameters


def from_sums(sums: Mapping[str, torch.Tensor], tasks: list[str], limit_mb: float = DEFAULT_LIMIT_MB,
              seed: int = 0, dim: int = projection.DEFAULT_DIM,
              free_disk_bytes: int | None = None) -> TaskGradients:
    """Exact when T x n_selected float32 values fit in `limit_mb` MB (10^6 bytes) and in
    `free_disk_bytes` less `DISK_MARGIN_BYTES` (when given); else the count sketch to `dim`.

    `sums[name]` is [T, *shape] (any float dtype, on any device: a CUDA device, pinned or plain
    host memory), row t the gradient of task `tasks[t]` (the engine's linear sums with the
    layout's task matrix). The sketch is computed where each tensor lives; only the exact
    gradients or the [T, dim] sketch come to the CPU.
    """
    params = [(name, list(value.shape[1:])) for name, value in sums.items()]
    reason = projection_reason(len(tasks), params, limit_mb, free_disk_bytes)
    if reason is None:
        tensors = {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in sums.items()}
        return TaskGradients("exact", list(tasks), params, tensors)
    sketch = projection.count_sketch(sums, dim, seed).to(torch.float32)
    return TaskGradients("projected", list(tasks), params, {"projection": sketch}, dim, seed,
                         projection.COUNT_SKETCH, reason)


def projection_reason(n_tasks: int, params: list[tuple[str, list[int]]], limit_mb: float,
                      free_disk_bytes: int | None) -> str | None:
    """Why the exact gradients (n_tasks x parameters x 4 B) cannot be saved, or None when they can."""
    exact_bytes = _exact_bytes(n_tasks, sum(_numel(shape) for _, shape in params))
    if exact_bytes > limit_mb * 1e6:
        return f"the exact task gradients need {exact_bytes / 1e6:.1f} MB, over --task-grads-limit {limit_mb:g} MB"
    if free_disk_bytes is not None and exact_bytes > free_disk_bytes - DISK_MARGIN_BYTES:
        return (f"the exact task gradients need {exact_bytes / 1e6:.1f} MB and the disk has "
                f"{free_disk_bytes / 1e6:.1f} MB free")
    return None


def write(path: Path, grads: TaskGradients) -> None:
    """Save to `path` (inside a staging directory: the scan directory is renamed in whole)."""
    from safetensors.torch import save_file

    metadata = {"format": "pt", "gradprobe": "task_grads", "kind": grads.kind,
                "tasks": json.dumps(grads.tasks), "params": json.dumps(grads.params)}
    if grads.kind == "projected":
        metadata.update({key: str(value) for key, value in grads.projection_info.items()})
    save_file(grads.tensors, str(path), metadata=metadata)


def read(path: Path) -> TaskGradients:
    """Load a task_grads.safetensors; a missing or unreadable file is a UserInputError."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserInputError(f"{path}: no such file (re-run the scan to save task gradients)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        kind = metadata["kind"]
        tasks = json.loads(metadata["tasks"])
        params = [(name, list(shape)) for name, shape in json.loads(metadata["params"])]
        projected = kind == "projected"
        dim = int(metadata["dim"]) if projected else None
        seed = int(metadata["seed"]) if projected else None
        # files written before the count sketch carry no `projection`: they are all Gaussian
        kind_of_projection = metadata.get("projection", projection.GAUSSIAN) if projected else None
    except Exception as exc:  # safetensors' own error type, KeyError, JSON errors: all corrupt
        raise UserInputError(f"{path}: corrupt task gradients file ({type(exc).__name__}: {exc})") from None
    if kind not in ("exact", "projected"):
        raise UserInputError(f"{path}: unknown task gradients kind {kind!r}")
    if projected and kind_of_projection not in projection.METHODS:
        raise UserInputError(f"{path}: unknown projection {kind_of_projection!r}")
    return TaskGradients(kind, tasks, params, tensors, dim, seed, kind_of_projection)


def check_comparable(a: TaskGradients, b: TaskGradients) -> None:
    """Raise UserInputError unless the two files hold the same kind of vectors over the same
    parameters (and, for projections, the same projection, dim and seed), so their cosines mean
    something."""
    if a.kind != b.kind:
        raise UserInputError(
            f"task gradients not comparable: one scan saved them {a.kind}, the other {b.kind}; "
            "re-run one scan with the other's --task-grads-limit"
        )
    if a.params != b.params:
        names_a, names_b = [n for n, _ in a.params], [n for n, _ in b.params]
        what = "parameter names" if names_a != names_b else "parameter shapes"
        raise UserInputError(
            f"task gradients not comparable: the scans differentiated different {what} "
            "(use the same model architecture and --params)"
        )
    if a.kind != "projected":
        return
    if a.projection != b.projection:
        raise UserInputError(
            f"task gradients not comparable: one scan saved a {a.projection} projection, the other "
            f"a {b.projection} one (older gradprobe versions saved gaussian); re-run the older scan"
        )
    if (a.dim, a.seed) != (b.dim, b.seed):
        raise UserInputError(
            f"task gradients not comparable: projections differ (dim {a.dim} seed {a.seed} against "
            f"dim {b.dim} seed {b.seed}); re-run one scan with the other's --task-grads-seed"
        )


def drift(a: TaskGradients, b: TaskGradients) -> dict[str, Any]:
    """Per task cos(g_t under A, g_t under B) (exact, or estimated through the projection with
    its Fisher 95% interval), and how it was computed (docs/metrics.md, "Learning gains")."""
    check_comparable(a, b)
    tasks: dict[str, Any] = {}
    for task in a.tasks:
        if task not in b.tasks:
            continue
        value = projection.cosine(a.task_vector(task), b.task_vector(task))
        row: dict[str, Any] = {"cosine": value}
        if a.kind == "projected" and value is not None:
            row["ci"] = list(projection.cosine_interval(value, a.dim or 1))
        tasks[task] = row
    out: dict[str, Any] = {"kind": a.kind, "tasks": tasks}
    if a.kind == "projected":
        info = a.projection_info
        bound = info.pop("cosine_error_bound_95")
        out.update(info, error_bound_95=bound,
                   error_note=f"{a.projection} projection to {a.dim} dimensions: each cosine is within "
                              f"+-{bound:.3f} of the exact one with about 95% probability")
    else:
        out.update(error_bound_95=0.0, error_note="exact gradients: cosines are exact (to float32 rounding)")
    return out
