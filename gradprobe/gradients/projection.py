"""Seeded random projections of task gradients, and the error of cosines through them.

Used for the drift of a task's gradient between two checkpoints (docs/metrics.md, "Learning gains";
the drift is cos(g_t under A, g_t under B)) when the exact gradients are too large to save.

Two projections S, each with E <S x, S y> = <x, y>:

- ``countsketch`` (what scans save): every coordinate i of every parameter tensor goes to one
  bucket h(i) of `dim` with a sign s(i) = +-1, and (S x)[b] = sum_{i : h(i) = b} s(i) x_i. It
  reads each coordinate once: O(parameters) per task, on the device where the vectors live.
  h and s come from `counter_hash` of the coordinate's index within its tensor, keyed by
  (seed, parameter name): no random generator state, so the same names, shapes and seed give the
  same projection on any machine and device, in any parameter order.
- ``gaussian`` (scans before the count sketch): S = R / sqrt(dim), R with N(0, 1) entries drawn per
  parameter from a CPU ``torch.Generator`` seeded with seed + crc32(name): O(parameters x dim)
  per task. Kept to read and benchmark the older files.

Error of a projected cosine, c_hat = cos(S x, S y) against c = cos(x, y). For unit x, y the
first-order error is L = <Sx, Sy> - (c/2) ||Sx||^2 - (c/2) ||Sy||^2, the quadratic form of
M = (x y^T + y x^T)/2 - (c/2)(x x^T + y y^T), whose Frobenius norm is ||M||_F^2 = (1 - c^2)^2 / 2.
- Gaussian: c_hat is the uncentred sample correlation of `dim` bivariate normal pairs, with
  standard deviation (1 - c^2) / sqrt(dim) and atanh(c_hat) close to normal with variance
  1 / (dim - 3) (Fisher).
- Count sketch (buckets and signs independent across coordinates): only pairs i != j that share a
  bucket contribute, Var L = (2 / dim) sum_{i != j} M_ij^2 <= (2 / dim) ||M||_F^2
  = (1 - c^2)^2 / dim: never more than the Gaussian's, for any x and y. Its distribution is close
  to normal when every bucket sums many coordinates none of which carries much of the norm
  (parameters >> dim, as for any model whose gradients are worth projecting).
So for both, |c_hat - c| <= z_{1-delta/2} / sqrt(dim) with probability about 1 - delta (the worst
case is c = 0), and tanh(atanh(c_hat) -+ z / sqrt(dim - 3)) covers c with probability about
1 - delta (for the count sketch at least that, its variance being at most the Gaussian's).
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping

import numpy as np
import torch

COUNT_SKETCH = "countsketch"
GAUSSIAN = "gaussian"
DEFAULT_DIM = 16384
MIN_DIM = 1024
CHUNK_ELEMENTS = 4096
"""Gaussian: parameter elements (columns of R) drawn at a time."""
COUNTER_BLOCK = 1 << 32
"""Elements of a tensor's flat index per 32-bit counter; each block has its own key."""
SKETCH_CHUNK_ELEMENTS = 1 << 22
"""Count sketch: parameter elements hashed at a time (it divides `COUNTER_BLOCK`, so no chunk
crosses a block)."""
HASH_MULTIPLIER = 0x45D9F3B
MASK_32 = 0xFFFFFFFF
Z_95 = 1.959963984540054

METHODS = {
    COUNT_SKETCH: "count sketch: bucket and sign of each coordinate from a 32-bit counter hash of its "
                  "index, keyed by blake2b(seed, parameter name); summed over parameters",
    GAUSSIAN: "Gaussian N(0, 1/dim) per parameter, CPU torch.Generator seeded with seed + crc32(name)",
}


def parameter_key(seed: int, name: str, block: int = 0) -> int:
    """The 32-bit hash key of one parameter: blake2b of "seed/block/name", little-endian.

    `block` numbers the 2^32-element blocks of a tensor's flat index (0 for every tensor smaller
    than 4G elements), so the key and the 32-bit counter together cover any index.
    """
    digest = hashlib.blake2b(f"{int(seed)}/{int(block)}/{name}".encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def counter_hash(counters: torch.Tensor, key: int) -> torch.Tensor:
    """h(i) for int64 counters 0 <= i < 2^32, on their device: x = i XOR key, then twice
    x = ((x >> 16) XOR x) * 0x45d9f3b mod 2^32, then h = (x >> 16) XOR x.

    Every intermediate stays below 2^59, so int64 arithmetic is exact on any device.
    """
    x = counters.to(torch.int64) ^ key
    for _ in range(2):
        x ^= x >> 16
        x *= HASH_MULTIPLIER
        x &= MASK_32
    x ^= x >> 16
    return x


def counter_hash_numpy(start: int, count: int, key: int) -> np.ndarray:
    """`counter_hash` of the counters start .. start + count - 1 (all below 2^32) in numpy's
    uint32 arithmetic (wrapping mod 2^32 by definition): the same bits, several times faster on the
    CPU than int64 tensors."""
    x = np.arange(start, start + count, dtype=np.uint32)
    x ^= np.uint32(key)
    for _ in range(2):
        x ^= x >> np.uint32(16)
        x *= np.uint32(HASH_MULTIPLIER)
    x ^= x >> np.uint32(16)
    return x


def _signed_buckets(start: int, count: int, key: int, dim: int, device: torch.device) -> torch.Tensor:
    """h(i) mod 2 dim for counters start ..: the bucket h mod dim, the sign bit (h // dim) mod 2."""
    if device.type == "cpu":
        return torch.from_numpy((counter_hash_numpy(start, count, key) & np.uint32(2 * dim - 1)).view(np.int32))
    counters = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return counter_hash(counters, key) & (2 * dim - 1)


def add_count_sketch(value: torch.Tensor, name: str, seed: int, halves: torch.Tensor, first: int = 0) -> None:
    """Add one parameter's signed bucket sums to `halves` [T, 2 dim] float64 (on value's device):
    halves[t, k] += sum_{i : h(i) mod 2 dim = k} value[t].flat[i], h the `counter_hash` of
    i mod 2^32 keyed by `parameter_key(seed, name, i // 2^32)`. The sketch is then
    S x = halves[:, :dim] - halves[:, dim:]: bucket h mod dim, sign from bit (h // dim) mod 2.
    With `first`, value holds the parameter's flat coordinates first, first + 1, ... (a shard):
    the sketches of a parameter's shards add up to the sketch of the whole.

    Adds in value's dtype promoted to at least float32 within a chunk, then in float64.
    """
    flat = value.detach().reshape(value.shape[0], -1)
    width = halves.shape[1]
    chunk = torch.empty((width,), dtype=torch.promote_types(flat.dtype, torch.float32), device=flat.device)
    start = 0
    while start < flat.shape[1]:
        block, offset = divmod(first + start, COUNTER_BLOCK)
        count = min(SKETCH_CHUNK_ELEMENTS, flat.shape[1] - start, COUNTER_BLOCK - offset)
        index = _signed_buckets(offset, count, parameter_key(seed, name, block), width // 2, flat.device)
        for t in range(flat.shape[0]):
            chunk.zero_().index_add_(0, index, flat[t, start : start + count].to(chunk.dtype))
            halves[t] += chunk
        start += count


def add_count_sketch_rows(values: torch.Tensor, rows: torch.Tensor, shape: tuple[int, ...], name: str,
                          seed: int, halves: torch.Tensor) -> None:
    """`add_count_sketch` of row-sparse vectors: `values` [T, len(rows), *shape[1:]] holds rows
    `rows` of [T, *shape] tensors that are zero elsewhere (an embedding's per-unit gradient).
    The same buckets and signs as the dense tensor's, at the flat indices of those rows only."""
    row_len = values[0, 0].numel() if values.shape[1] else 0
    if row_len == 0:
        return
    flat_index = (rows.to(torch.int64)[:, None] * row_len
                  + torch.arange(row_len, device=rows.device)[None, :]).reshape(-1)
    flat = values.reshape(values.shape[0], -1).to(torch.promote_types(values.dtype, torch.float32))
    width = halves.shape[1]
    for block in torch.unique(flat_index // COUNTER_BLOCK).tolist():
        mine = (flat_index // COUNTER_BLOCK == block).nonzero().flatten()
        index = counter_hash(flat_index[mine] % COUNTER_BLOCK, parameter_key(seed, name, block)) & (width - 1)
        halves.index_add_(1, index.to(halves.device), flat[:, mine].to(halves.dtype))


def count_sketch(vectors: Mapping[str, torch.Tensor], dim: int = DEFAULT_DIM, seed: int = 0) -> torch.Tensor:
    """S v for each of T vectors stored per parameter, `vectors[name]` [T, *shape] on any devices:
    [T, dim] float64 on the CPU, (S v)[t, b] = sum over parameters and their coordinates i with
    h(i) mod dim = b of (-1)^((h(i) // dim) mod 2) v[name][t].flat[i] (`add_count_sketch`), each
    parameter added on its own device. `dim` must be a power of two."""
    if dim < 1 or dim & (dim - 1) or dim > 2**30:
        raise ValueError(f"count sketch dimension must be a power of two up to 2^30, not {dim}")
    if not vectors:
        raise ValueError("nothing to project: no parameters")
    rows = next(iter(vectors.values())).shape[0]
    halves: dict[torch.device, torch.Tensor] = {}  # one buffer per device: no allocation per parameter
    for name in sorted(vectors):
        device = vectors[name].device
        if device not in halves:
            halves[device] = torch.zeros((rows, 2 * dim), dtype=torch.float64, device=device)
        add_count_sketch(vectors[name], name, seed, halves[device])
    parts = [(h[:, :dim] - h[:, dim:]).cpu() for h in halves.values()]
    return sum(parts[1:], parts[0])


def parameter_seed(seed: int, name: str) -> int:
    """Gaussian: the generator seed of one parameter's block, seed + crc32(name) in 63 bits."""
    return (int(seed) + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def gaussian_projection(vectors: Mapping[str, torch.Tensor], dim: int = 2048, seed: int = 0) -> torch.Tensor:
    """The older projection, P v = sum over parameters of v[name] @ R_name^T / sqrt(dim): [T, dim]
    float64, R_name drawn on the CPU in chunks of `CHUNK_ELEMENTS` columns from a generator seeded
    with `parameter_seed`. O(parameters x dim) per task."""
    if dim < 1:
        raise ValueError("projection dimension must be positive")
    first = next(iter(vectors.values()))
    out = torch.zeros((first.shape[0], dim), dtype=torch.float64)
    generator = torch.Generator(device="cpu")
    for name in sorted(vectors):
        flat = vectors[name].reshape(vectors[name].shape[0], -1).to("cpu", torch.float32)
        generator.manual_seed(parameter_seed(seed, name))
        for start in range(0, flat.shape[1], CHUNK_ELEMENTS):
            block = flat[:, start : start + CHUNK_ELEMENTS]
            r = torch.randn((block.shape[1], dim), generator=generator, dtype=torch.float32)
            out += (block @ r).double()
    return out / math.sqrt(dim)


def cosine(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """cos(x, y) = x.y / (||x|| ||y||) in float64; None when either vector is zero."""
    x, y = x.double().flatten(), y.double().flatten()
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0 or ny == 0:
        return None
    return max(-1.0, min(1.0, float(x @ y) / (nx * ny)))


def cosine_error_bound(dim: int, z: float = Z_95) -> float:
    """z / sqrt(dim): about a 95% bound on |cos(Sx, Sy) - cos(x, y)| for any x, y (z = 1.96),
    for both projections (module docstring)."""
    return z / math.sqrt(dim)


def cosine_interval(estimate: float, dim: int, z: float = Z_95) -> tuple[float, float]:
    """Fisher interval tanh(atanh(c_hat) -+ z / sqrt(dim - 3)) for the true cosine."""
    clipped = max(-1 + 1e-12, min(1 - 1e-12, estimate))
    centre, half = math.atanh(clipped), z / math.sqrt(max(dim - 3, 1))
    return math.tanh(centre - half), math.tanh(centre + half)
