"""Task sums sharded over ranks, and parameters sharded with FSDP2 (`--shard`).

Each rank holds 1/N of every selected parameter's flattened sums: for a parameter of n
coordinates, rank r holds coordinates [r c, (r + 1) c) of its [n_sums, n] sums, c = ceil(n / N)
(`SumShards`). The ranks run their micro-batches in lockstep (a rank without one runs an empty
step), and in every step, after each module's hook has reduced its units, the step's local
contributions to that module's parameters are reduce-scattered into the shards:

    shard_r(s_k) += sum over ranks q of [contribution of q's units to s_k]_r.

Only the sums some rank touches in the step are exchanged (the union over ranks of the tasks of
their micro-batches, known to every rank from the deterministic prompt assignment), so a step
moves (touched sums) x (parameter) x 4 bytes per module: about a gradient per touched sum,
where a training step with FSDP reduce-scatters one gradient.

Dot products of sums are sums over shards of local dot products, completed by one all-reduce of
the [groups, n_sums, n_sums] Gram. The exact pass needs each unit's row dot <u_a, t_a> against
its task gradient t_a = targets[a] . s, a combination of sums. A unit's gradient exists, whole,
only on the rank that holds its prompt, and only inside its module's hook; the targets are
sharded. So each rank all-gathers, per module and step, the targets the step's units need (one
parameter's worth per target: targets x parameter x 4 bytes), keeps them while the module's hook
runs and frees them. The other way round, moving each unit's gradient to the shards, would cost
units x parameter bytes, and a step has more units than targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradprobe.distributed.session import Session
from gradprobe.gradients.engine import PassCompletion, Reductions, SelectedParameters, StreamingReductions, SumShards
from gradprobe.gradients.unit_rules import PerUnit, add_weighted

SHARD_MODES = {
    "auto": "replicated (none) when that plan fits one device's memory, else params",
    "none": "weights and task sums whole on every rank; sums all-reduced after each pass",
    "sums": "task sums sharded (reduce-scatter per micro-batch), weights whole on every rank",
    "params": "weights sharded with FSDP2 fully_shard and task sums sharded",
}


class ShardedReductions(StreamingReductions):
    """`StreamingReductions` whose sums are this rank's shards (module docstring).

    `step_sums[s]` and `step_targets[s]`: the sums touched and the targets needed by any rank's
    micro-batch at step s, sorted; every rank has the same lists."""

    def __init__(self, selected: SelectedParameters, reductions: Reductions, session: Session,
                 step_sums: Sequence[list[int]], step_targets: Sequence[list[int]],
                 sums_device: torch.device | None = None, sketch_dim: int | None = None,
                 completion: PassCompletion | None = None) -> None:
        self.session = session
        self.shards = SumShards(session.rank, session.world)
        super().__init__(selected, reductions, sums_device, sketch_dim, completion=completion)
        self.step_sums, self.step_targets = step_sums, step_targets
        self.pending: dict[str, torch.Tensor] = {}
        self.gathered: dict[str, torch.Tensor] = {}
        self.begin_step(0)

    def allocate_sums(self, n_sums: int) -> dict[str, torch.Tensor]:
        return {n: torch.zeros((n_sums, self.shards.length(self.selected.size(n))), dtype=self.selected.dtype,
                               device=self.sums_device) for n in self.selected.names}

    def sum_shards(self) -> SumShards:
        return self.shards

    def begin_step(self, step: int) -> None:
        self.session.in_lockstep = True  # until the pass ends (`end_pass_one`, `end_pass_two`)
        self.rows = torch.tensor(self.step_sums[step] if step < len(self.step_sums) else [], dtype=torch.long)
        self.row_position = {k: i for i, k in enumerate(self.rows.tolist())}
        self.target_indices = self.step_targets[step] if step < len(self.step_targets) else []
        self.pending.clear()
        self.gathered.clear()

    # ---- pass 1: contributions, reduce-scattered per use -------------------------------------
    def add_sum_contributions(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """pending[name][:, step position of each row] += values, laid out [world, rows, shard]."""
        world, length = self.shards.world, self.shards.length(self.selected.size(name))
        pending = self.pending.get(name)
        if pending is None:
            pending = self.pending[name] = torch.zeros((world, len(self.rows), length), dtype=self.selected.dtype,
                                                       device=self.selected.device)
        flat = values.reshape(values.shape[0], -1).to(pending.dtype)
        flat = torch.nn.functional.pad(flat, (0, world * length - flat.shape[1]))
        positions = torch.tensor([self.row_position[k] for k in rows.tolist()], device=pending.device)
        pending.index_add_(1, positions, flat.view(len(positions), world, length).transpose(0, 1))

    def add_sums(self, name: str, prompt_ids: list[int], part: PerUnit) -> None:
        rows, weights = self.touched_sums(prompt_ids)
        contribution = torch.zeros((len(rows), *self.selected.shapes[name]), dtype=self.selected.dtype,
                                   device=self.selected.device)
        add_weighted(contribution, weights, part)
        self.add_sum_contributions(name, rows, contribution)

    def end_use(self, names: list[str]) -> None:
        """Pass 1: reduce-scatter this use's contributions (zeros on a rank that had none) into
        the shards. Pass 2: free the gathered targets."""
        for name in names:
            self.gathered.pop(name, None)
            pending = self.pending.pop(name, None)
            if self.in_pass_two or not len(self.rows):
                continue
            length = self.shards.length(self.selected.size(name))
            if pending is None:
                pending = torch.zeros((self.shards.world, len(self.rows), length), dtype=self.selected.dtype,
                                      device=self.selected.device)
            mine = torch.empty((len(self.rows), length), dtype=pending.dtype, device=pending.device)
            self.session.reduce_scatter(mine, pending, "sums (reduce-scatter)")
            self.sums[name].index_add_(0, self.rows.to(self.sums_device), mine.to(self.sums_device))

    # ---- pass 2: targets gathered per use -----------------------------------------------------
    in_pass_two = False

    def end_pass_one(self) -> None:
        self.in_pass_two = True
        self.session.in_lockstep = False
        super().end_pass_one()

    def end_pass_two(self) -> None:
        self.session.in_lockstep = False
        super().end_pass_two()

    def prepare_use(self, names: list[str]) -> None:
        """All-gather, for each of these parameters, the targets this step's units need."""
        if not self.in_pass_two or not self.target_indices:
            return
        index = torch.tensor(self.target_indices, device=self.sums_device)
        for name in names:
            local = torch.tensordot(self.targets[index], self.sums[name], dims=1)  # [targets, shard]
            whole = torch.empty((self.shards.world, *local.shape), dtype=local.dtype, device=local.device)
            self.session.all_gather(whole, local, "targets (all-gather)")
            flat = whole.transpose(0, 1).reshape(len(index), -1)[:, :self.selected.size(name)]
            self.gathered[name] = flat.reshape(len(index), *self.selected.shapes[name]).to(self.selected.device)

    def target_of(self, name: str, index: int) -> torch.Tensor:
        return self.gathered[name][self.target_indices.index(index)]

    # ---- results ------------------------------------------------------------------------------
    def sum_dots(self) -> torch.Tensor:
        """Local Grams of the shards, added over ranks by one all-reduce."""
        dots = super().sum_dots()
        self.session.all_reduce_sum(dots, "sum dots")
        return dots


def shard_rows(value: torch.Tensor, shards: SumShards, shape: Sequence[int]) -> torch.Tensor:
    """The whole [rows, *shape] tensor from every rank's [rows, shard] (an all-gather; every rank
    gets it)."""
    from gradprobe import distributed

    session = distributed.current()
    whole = torch.empty((shards.world, *value.shape), dtype=value.dtype, device=value.device)
    session.all_gather(whole, value.contiguous(), "task gradients (all-gather)")
    numel = 1
    for size in shape:
        numel *= int(size)
    return whole.transpose(0, 1).reshape(value.shape[0], -1)[:, :numel].reshape(value.shape[0], *shape)


def step_needs(plans: Sequence[Sequence[list[int] | None]], reductions: Reductions) -> tuple[list[list[int]], list[list[int]]]:
    """Per step, the sums touched and the targets needed by any rank's micro-batch."""
    weights = reductions.sum_weights
    sums, targets = [], []
    for step in range(max(len(p) for p in plans)):
        units = [u for plan in plans if step < len(plan) and plan[step] is not None
                 for p in plan[step] for u in reductions.prompts[p]]
        touched = (weights[:, units] != 0).any(1).nonzero().flatten().tolist() if units else []
        sums.append(touched)
        targets.append(sorted({reductions.unit_target[u] for u in units}))
    return sums, targets


def shard_parameters(model: torch.nn.Module, session: Session) -> bool:
    """Shard the model's parameters with FSDP2 `fully_shard`: each decoder layer a unit, the rest
    (embeddings, final norm, head; tied weights stay one parameter) the root's. The parameters
    are frozen first: FSDP2 then gathers them for forward and backward and computes no
    gradient. False when the model was already sharded (by the caller's trainer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        return False
    model.requires_grad_(False)
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (session.world,))
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return True


def task_gradients(sums: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], shards: SumShards,
                   tasks: list[str], limit_mb: float, seed: int, free_disk_bytes: int | None,
                   session: Session):
    """`task_grads.from_sums` of sharded sign sums, every rank taking part; rank 0 gets the
    `TaskGradients` (the same file a single process writes), the others None.

    Exact (when rank 0's limit and disk allow): each parameter's task gradients [T, shard] are
    all-gathered one parameter at a time. Projected: the count sketch is linear and keyed by each
    coordinate's global index, so every rank sketches its shards (`add_count_sketch` with their
    first coordinate) and one all-reduce of the [T, 2 dim] bucket sums gives the whole sketch."""
    from gradprobe import task_grads
    from gradprobe.gradients import projection

    params = [(name, list(shapes[name])) for name in sums]
    reason = task_grads.projection_reason(len(tasks), params, limit_mb, free_disk_bytes)
    reason = session.all_gather_objects(reason, "task gradients (decision)")[0]  # rank 0's disk decides
    paired = {name: value.view(value.shape[0] // 2, 2, -1).sum(1) for name, value in sums.items()}
    if reason is None:
        tensors = {}
        for name, value in paired.items():
            whole = shard_rows(value, shards, shapes[name])
            if session.is_writer:
                tensors[name] = whole.to("cpu", torch.float32).contiguous()
        return task_grads.TaskGradients("exact", list(tasks), params, tensors) if session.is_writer else None
    dim = projection.DEFAULT_DIM
    first = next(iter(paired.values()))
    halves = torch.zeros((first.shape[0], 2 * dim), dtype=torch.float64, device=first.device)
    for name in sorted(paired):
        numel = 1
        for size in shapes[name]:
            numel *= int(size)
        start = shards.rank * shards.length(numel)
        mine = paired[name][:, :max(0, min(shards.length(numel), numel - start))]
        projection.add_count_sketch(mine, name, seed, halves, first=start)
    session.all_reduce_sum(halves, "task gradients (sketch)")
    if not session.is_writer:
        return None
    sketch = (halves[:, :dim] - halves[:, dim:]).cpu().to(torch.float32)
    return task_grads.TaskGradients("projected", list(tasks), params, {"projection": sketch}, dim, seed,
                                    projection.COUNT_SKETCH, reason)
