"""A seeded Gaussian random projection of task gradients, and the error of cosines through it.

Used for the drift of a task's gradient between two checkpoints (docs/metrics.md, "Learning gains";
the drift is cos(g_t under A, g_t under B)) when the exact gradients are too large to save.

The projection is P = R / sqrt(k) with R a k x n matrix of independent N(0, 1) entries, so
E ||P x||^2 = ||x||^2 and <P x, P y> is unbiased for <x, y> (Johnson-Lindenstrauss). The block of
R that multiplies parameter `name` is drawn from a CPU ``torch.Generator`` seeded with
``seed + crc32(name)``, in chunks of `CHUNK_ELEMENTS` parameter elements (columns), so the same
parameter names, shapes and seed give the same projection on any machine, in any parameter order,
and memory stays at k x CHUNK_ELEMENTS floats.

Error of a projected cosine. For fixed x, y each row r of R gives (r.x, r.y), a zero-mean
bivariate normal pair with correlation c = cos(x, y); the projected cosine
c_hat = cos(P x, P y) is the (uncentred) sample correlation of k such pairs. Its standard
deviation is (1 - c^2) / sqrt(k) to first order, and atanh(c_hat) is close to normal with
variance 1 / (k - 3) (Fisher). So |c_hat - c| <= z_{1-delta/2} / sqrt(k) with probability about
1 - delta for every c (the worst case is c = 0), and the interval
tanh(atanh(c_hat) -+ z / sqrt(k - 3)) covers c with probability about 1 - delta.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch

DEFAULT_DIM = 2048
MIN_DIM = 1024
CHUNK_ELEMENTS = 4096
Z_95 = 1.959963984540054


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter's block: seed + crc32(name), kept in 63 bits."""
    return (int(seed) + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def project(vectors: Mapping[str, torch.Tensor], dim: int = DEFAULT_DIM, seed: int = 0) -> torch.Tensor:
    """P v for each of T vectors stored per parameter: `vectors[name]` is [T, *shape].

    Returns [T, dim] float64: sum over parameters of v[name] @ R_name^T / sqrt(dim), with
    R_name drawn chunk by chunk as the module docstring says.
    """
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
    """z / sqrt(k): about a 95% bound on |cos(Px, Py) - cos(x, y)| for any x, y (z = 1.96)."""
    return z / math.sqrt(dim)


def cosine_interval(estimate: float, dim: int, z: float = Z_95) -> tuple[float, float]:
    """Fisher interval tanh(atanh(c_hat) -+ z / sqrt(k - 3)) for the true cosine."""
    clipped = max(-1 + 1e-12, min(1 - 1e-12, estimate))
    centre, half = math.atanh(clipped), z / math.sqrt(max(dim - 3, 1))
    return math.tanh(centre - half), math.tanh(centre + half)
