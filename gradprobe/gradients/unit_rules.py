"""Per-unit parameter gradients of one module from its input and its output gradient.

The hooked engine (`gradients.hooked`) runs one forward and one backward over a micro-batch of
sequences and, for every module that owns a selected parameter, receives the module's input x and
the gradient g of the loss with respect to its output. A *rule* turns (x, g) into each unit's
gradient of the module's parameters. Rules are registered per module type, as Opacus registers
its per-sample gradient samplers; `rule_for` falls back to a generic torch.func rule for any other
leaf module (RMSNorm and LayerNorm variants, for instance).

Sequences of a micro-batch are rows of x; the rows of one unit are contiguous, so a unit's
tokens are one slice of the flattened [rows x positions] axis. For a linear layer the weight
gradient of a set S of tokens is sum_{t in S} g_t x_t^T (docs/engine.md): a unit's gradient is
the layer's weight-gradient matmul restricted to the unit's tokens, so all units together cost
the FLOPs of the one weight gradient a training step computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call, vjp, vmap


@dataclass
class MicroBatchUnits:
    """Which rows (sequences) of a micro-batch belong to which of its units."""

    row_unit: torch.Tensor
    """[rows]: the local unit index of each sequence."""
    unit_rows: list[tuple[int, int]]
    """For each local unit, its rows [start, end)."""
    allocate: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = (
        lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    """Uninitialised [units, ...] output buffers; the engine reuses them across layers, since on
    the CPU fresh large allocations are page-faulted in and cost as much as the matmul."""

    @property
    def n_units(self) -> int:
        return len(self.unit_rows)

    def sum_rows(self, per_row: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [units, ...]: each unit's sum over its rows."""
        return per_row.new_zeros((self.n_units, *per_row.shape[1:])).index_add_(0, self.row_unit, per_row)


@dataclass
class PerUnit:
    """Per-unit gradients of one parameter: values[u] is unit u's gradient.

    With `rows` set, values is [units, len(rows), *shape[1:]] and holds only those rows of the
    parameter (an embedding matrix, of which a micro-batch touches few rows); the rest are zero.
    """

    values: torch.Tensor
    rows: torch.Tensor | None = None

    def dense(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.rows is None:
            return self.values
        full = self.values.new_zeros((self.values.shape[0], *shape))
        full[:, self.rows] = self.values
        return full


def _aligned(a: PerUnit, b: PerUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parts' values over the rows they share (all rows when both are dense)."""
    if a.rows is not None and b.rows is not None:
        # torch.unique sorts, so the shared rows come in the same order on both sides.
        return a.values[:, torch.isin(a.rows, b.rows)], b.values[:, torch.isin(b.rows, a.rows)]
    if a.rows is not None:
        return a.values, b.values[:, a.rows]
    if b.rows is not None:
        return a.values[:, b.rows], b.values
    return a.values, b.values


def prompt_products(a: PerUnit, b: PerUnit, k: int) -> torch.Tensor:
    """[prompts, k, k]: <a_i, b_j> for units i, j of the same prompt, the units coming k per
    prompt in order (a batched matmul: no pair across prompts is formed)."""
    a_values, b_values = _aligned(a, b)
    n = a_values.shape[0] // k
    return torch.bmm(a_values.reshape(n, k, -1), b_values.reshape(n, k, -1).transpose(1, 2))


def restricted(part: PerUnit, rows: torch.Tensor) -> PerUnit:
    """A copy of the part's values at `rows` only (sorted, unique): what a tied parameter's
    other, sparse use can meet."""
    if part.rows is None:
        return PerUnit(part.values[:, rows].clone(), rows)
    keep = torch.isin(part.rows, rows)
    return PerUnit(part.values[:, keep].clone(), part.rows[keep])


def add_weighted(total: torch.Tensor, weights: torch.Tensor, part: PerUnit) -> None:
    """total += weights @ part, for total [n_sums, *shape] and weights [n_sums, units]."""
    if part.rows is None:  # in place: a fresh [n_sums, *shape] temporary costs page faults on CPU
        total.view(total.shape[0], -1).addmm_(weights, part.values.reshape(part.values.shape[0], -1))
    else:
        total.index_add_(1, part.rows, torch.tensordot(weights, part.values, dims=1))


Rule = Callable[[torch.nn.Module, list[str], torch.Tensor, torch.Tensor, MicroBatchUnits, torch.dtype],
                dict[str, PerUnit]]
UNIT_RULES: dict[type | str, Rule] = {}


def register_unit_rule(*module_types: type | str) -> Callable[[Rule], Rule]:
    """Decorator: `rule(module, names, x, g, units, dtype)` gives per-unit gradients of `names`
    for modules of these types (classes, or class names for classes that live in many files)."""

    return _registering(UNIT_RULES, module_types)


def _registering(table: dict, module_types: tuple[type | str, ...]) -> Callable:
    """A decorator that enters its function in `table` under each of `module_types`."""

    def register(rule: Callable) -> Callable:
        for module_type in module_types:
            table[module_type] = rule
        return rule

    return register


def _registered(table: dict, module: torch.nn.Module) -> Callable | None:
    """`table`'s entry for the module's type or a base type (classes, or class names for
    classes that live in many files), else None."""
    for cls in type(module).__mro__:
        for key in (cls, cls.__name__):
            if key in table:
                return table[key]
    return None


def rule_for(module: torch.nn.Module) -> Rule | None:
    """The registered rule for the module's type (or a base type), else the generic one for leaf
    modules; None for a module with children, whose parameters no single call describes."""
    rule = _registered(UNIT_RULES, module)
    if rule is not None:
        return rule
    if next(module.children(), None) is None:
        return generic_rule
    return None


# Above this many bytes of per-row gradients a linear layer is done one unit at a time.
PER_ROW_LIMIT_BYTES = 8 << 20


@register_unit_rule(torch.nn.Linear)
def linear_rule(module: torch.nn.Linear, names: list[str], x: torch.Tensor, g: torch.Tensor,
                units: MicroBatchUnits, dtype: torch.dtype) -> dict[str, PerUnit]:
    """weight_u = sum_{t in u} g_t x_t^T, bias_u = sum_{t in u} g_t."""
    rows = x.shape[0]
    x = x.reshape(rows, -1, x.shape[-1]).to(dtype)
    g = g.reshape(rows, -1, g.shape[-1]).to(dtype)
    out: dict[str, PerUnit] = {}
    if "weight" in names:
        d_out, d_in = g.shape[-1], x.shape[-1]
        if rows * d_out * d_in * g.element_size() <= PER_ROW_LIMIT_BYTES:
            # Small layers: one batched matmul per row, then rows summed into units.
            per_row = torch.bmm(g.transpose(1, 2), x)
            weight = units.sum_rows(per_row)
        else:
            length = x.shape[1]
            flat_x, flat_g = x.reshape(-1, d_in), g.reshape(-1, d_out)
            weight = units.allocate((units.n_units, d_out, d_in), dtype, x.device)
            for u, (start, end) in enumerate(units.unit_rows):
                torch.mm(flat_g[start * length : end * length].T, flat_x[start * length : end * length],
                         out=weight[u])
        out["weight"] = PerUnit(weight)
    if "bias" in names:
        out["bias"] = PerUnit(units.sum_rows(g.sum(1)))
    return out


@register_unit_rule(torch.nn.Embedding)
def embedding_rule(module: torch.nn.Embedding, names: list[str], x: torch.Tensor, g: torch.Tensor,
                   units: MicroBatchUnits, dtype: torch.dtype) -> dict[str, PerUnit]:
    """Row v of unit u's gradient is sum of g_t over u's tokens t with id v (equal ids grouped);
    tokens with the module's padding_idx add nothing, as in nn.Embedding's own backward."""
    rows, inverse = torch.unique(x, return_inverse=True)
    g = g.reshape(-1, g.shape[-1]).to(dtype)
    if module.padding_idx is not None:
        g = g * (x.reshape(-1, 1) != module.padding_idx).to(dtype)
    key = (units.row_unit[:, None] * len(rows) + inverse.reshape(x.shape[0], -1)).reshape(-1)
    values = g.new_zeros((units.n_units * len(rows), g.shape[-1])).index_add_(0, key, g)
    return {"weight": PerUnit(values.view(units.n_units, len(rows), -1), rows)}


@register_unit_rule("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm")
def rms_norm_rule(module: torch.nn.Module, names: list[str], x: torch.Tensor, g: torch.Tensor,
                  units: MicroBatchUnits, dtype: torch.dtype) -> dict[str, PerUnit]:
    """For y = weight * xhat, xhat = x / sqrt(mean(x^2) + eps) in float32 cast back to x's dtype
    (these classes' forward, to the rounding): weight_u = sum_{t in u} g_t * xhat_t."""
    wide = x.to(torch.float32)
    xhat = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)
    per_row = (g.to(dtype) * xhat.to(dtype)).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
    return {"weight": PerUnit(units.sum_rows(per_row))}


def generic_rule(module: torch.nn.Module, names: list[str], x: torch.Tensor, g: torch.Tensor,
                 units: MicroBatchUnits, dtype: torch.dtype) -> dict[str, PerUnit]:
    """Any module that treats rows independently: each row's vector-Jacobian product with
    torch.func (the module's own forward, run again per row), summed into units."""
    params = {n: getattr(module, n).detach() for n in names}

    def row_gradient(x_row: torch.Tensor, g_row: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pull = vjp(lambda p: functional_call(module, p, (x_row[None],)), params)
        return pull(g_row[None].to(x_row.dtype))[0]

    per_row = vmap(row_gradient)(x, g)
    return {n: PerUnit(units.sum_rows(v.to(dtype))) for n, v in per_row.items()}


TargetOf = Callable[[str, int], torch.Tensor]
"""target_of(local name, index): target vector `index` restricted to one of the module's
parameters, on the compute device."""
RowDotRule = Callable[[torch.nn.Module, list[str], torch.Tensor, torch.Tensor, MicroBatchUnits, torch.Tensor,
                       TargetOf, torch.dtype], dict[str, torch.Tensor]]
ROW_DOT_RULES: dict[type | str, RowDotRule] = {}


def register_row_dot_rule(*module_types: type | str) -> Callable[[RowDotRule], RowDotRule]:
    """Decorator: `rule(module, names, x, g, units, unit_target, target_of, dtype)` gives, per
    local name, [units] the inner products <grad_a, target of a> of each unit's gradient with its
    target, without building the per-unit gradients (exact intervals' second pass)."""

    return _registering(ROW_DOT_RULES, module_types)


def row_dot_rule_for(module: torch.nn.Module) -> RowDotRule | None:
    """The registered row-dot rule for the module's type (or a base type), else None: the engine
    then builds the per-unit gradients with `rule_for` and takes their inner products."""
    return _registered(ROW_DOT_RULES, module)


def _rows_by_target(units: MicroBatchUnits, unit_target: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(target index, the rows whose unit has that target), for each target the rows meet."""
    row_target = unit_target[units.row_unit]
    return [(index, (row_target == index).nonzero().flatten()) for index in torch.unique(row_target).tolist()]


@register_row_dot_rule(torch.nn.Linear)
def linear_row_dots(module: torch.nn.Linear, names: list[str], x: torch.Tensor, g: torch.Tensor,
                    units: MicroBatchUnits, unit_target: torch.Tensor, target_of: TargetOf,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """<weight_a, T> = sum_{i in a} g_i . (T x_i) and <bias_a, t> = sum_{i in a} g_i . t, for
    each unit a and its target (T, t): one matmul with the target per token, the FLOPs of one
    weight-gradient matmul and no per-unit [d_out, d_in] buffer (docs/engine.md)."""
    rows = x.shape[0]
    x = x.reshape(rows, -1, x.shape[-1]).to(dtype)
    g = g.reshape(rows, -1, g.shape[-1]).to(dtype)
    out = {name: torch.zeros(units.n_units, dtype=dtype, device=x.device) for name in names}
    for index, selected in _rows_by_target(units, unit_target):
        g_part, owners = g[selected], units.row_unit[selected]
        if "weight" in names:
            target = target_of("weight", index).to(dtype)
            if x.shape[-1] <= g.shape[-1]:  # project onto the narrower side: the smaller temporary
                per_row = ((g_part @ target) * x[selected]).sum((1, 2))
            else:
                per_row = ((x[selected] @ target.T) * g_part).sum((1, 2))
            out["weight"].index_add_(0, owners, per_row)
        if "bias" in names:
            out["bias"].index_add_(0, owners, g_part.sum(1) @ target_of("bias", index).to(dtype))
    return out


@register_row_dot_rule(torch.nn.Embedding)
def embedding_row_dots(module: torch.nn.Embedding, names: list[str], x: torch.Tensor, g: torch.Tensor,
                       units: MicroBatchUnits, unit_target: torch.Tensor, target_of: TargetOf,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """<weight_a, T> = sum_{i in a} g_i . T[id_i] over unit a's tokens (padding_idx excluded,
    as in `embedding_rule`): the target's rows gathered at the token ids."""
    g = g.reshape(x.shape[0], -1, g.shape[-1]).to(dtype)
    if module.padding_idx is not None:
        g = g * (x != module.padding_idx).unsqueeze(-1).to(dtype)
    out = torch.zeros(units.n_units, dtype=dtype, device=g.device)
    for index, selected in _rows_by_target(units, unit_target):
        gathered = target_of("weight", index).to(dtype)[x[selected]]  # [rows, positions, dim]
        out.index_add_(0, units.row_unit[selected], (gathered * g[selected]).sum((1, 2)))
    return {"weight": out}


def ghost_is_cheaper(tokens_per_prompt: int, d_in: int, d_out: int) -> bool:
    """The ghost norm costs O(T^2 (d_in + d_out)) per prompt of T tokens, building each unit's
    weight gradient O(T d_in d_out): ghost when T (d_in + d_out) < d_in d_out (the rule of
    Opacus' ghost clipping and fastDP's mixed book-keeping)."""
    return tokens_per_prompt * (d_in + d_out) < d_in * d_out


def linear_ghost_grams(x: torch.Tensor, g: torch.Tensor, units: MicroBatchUnits, k: int,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each prompt's Gram of its k units' gradients of a linear layer without building them:

        <W_a, W_b> = sum_{i in a, j in b} (x_i . x_j)(g_i . g_j),   <bias_a, bias_b> = sum (g_i . g_j),

    over the tokens i, j of units a, b (docs/engine.md, "ghost norm"). [prompts, k, k] each."""
    rows = x.shape[0]
    x = x.reshape(rows, -1, x.shape[-1]).to(dtype)
    g = g.reshape(rows, -1, g.shape[-1]).to(dtype)
    length = x.shape[1]
    weight, bias = [], []
    for first in range(0, units.n_units, k):
        start, end = units.unit_rows[first][0], units.unit_rows[first + k - 1][1]
        a, b = x[start:end].reshape(-1, x.shape[-1]), g[start:end].reshape(-1, g.shape[-1])
        token_unit = (units.row_unit[start:end] - first).repeat_interleave(length)
        one_hot = torch.nn.functional.one_hot(token_unit, k).to(dtype)
        outputs = b @ b.T
        weight.append(one_hot.T @ ((a @ a.T) * outputs) @ one_hot)
        bias.append(one_hot.T @ outputs @ one_hot)
    return {"weight": torch.stack(weight), "bias": torch.stack(bias)}


def linear_segment_sums(x: torch.Tensor, g: torch.Tensor, units: MicroBatchUnits, weights: torch.Tensor,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """sum_a W[r, a] (weight_a, bias_a) for each row r of `weights` [n, units]: one weight-gradient
    matmul over the tokens of the units each row touches (their gradients never built)."""
    rows = x.shape[0]
    x = x.reshape(rows, -1, x.shape[-1]).to(dtype)
    g = g.reshape(rows, -1, g.shape[-1]).to(dtype)
    row_weights = weights.to(dtype)[:, units.row_unit]  # [n, rows]
    weight = g.new_zeros((weights.shape[0], g.shape[-1], x.shape[-1]))
    bias = g.new_zeros((weights.shape[0], g.shape[-1]))
    for r in range(weights.shape[0]):
        touched = row_weights[r].nonzero().flatten()
        if len(touched) == 0:
            continue
        scaled = g[touched] * row_weights[r, touched, None, None]
        weight[r] = scaled.reshape(-1, g.shape[-1]).T @ x[touched].reshape(-1, x.shape[-1])
        bias[r] = scaled.sum((0, 1))
    return {"weight": weight, "bias": bias}
