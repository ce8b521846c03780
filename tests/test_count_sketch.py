"""The count sketch task_grads.safetensors holds: its hash against an independent pure-Python one,
determinism across processes, dtypes and devices, linearity, chunking, and its cosine error
bound and interval by seeded simulation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradprobe import task_grads
from gradprobe.gradients import projection


def python_hash(i: int, key: int) -> int:
    """counter_hash in Python integers, written from its docstring."""
    x = i ^ key
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) % 2**32
    return (x >> 16) ^ x


def reference_sketch(vectors: dict[str, torch.Tensor], dim: int, seed: int, block: int = 2**32) -> torch.Tensor:
    """(S x)[b] = sum over coordinates with h mod dim = b of (-1)^((h // dim) mod 2) x_i, in float64."""
    rows = next(iter(vectors.values())).shape[0]
    out = torch.zeros((rows, dim), dtype=torch.float64)
    for name, value in vectors.items():
        flat = value.reshape(rows, -1).double()
        for i in range(flat.shape[1]):
            h = python_hash(i % block, projection.parameter_key(seed, name, i // block))
            out[:, h % dim] += (-1) ** ((h // dim) % 2) * flat[:, i]
    return out


def small_vectors(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(3, 30, 20, generator=g, dtype=torch.float64).to(dtype),
            "layer.bias": torch.randn(3, 20, generator=g, dtype=torch.float64).to(dtype)}


def test_hash_agrees_with_python_in_torch_and_numpy():
    key = projection.parameter_key(3, "model.embed_tokens.weight")
    for start in (0, 12345, 2**32 - 64):  # the top of the 32-bit counter too
        expected = [python_hash(i, key) for i in range(start, start + 64)]
        assert projection.counter_hash(torch.arange(start, start + 64), key).tolist() == expected
        assert projection.counter_hash_numpy(start, 64, key).astype(np.int64).tolist() == expected
    # pinned values: a change of hash or key would silently make new scans incomparable with old ones
    assert projection.parameter_key(0, "w") == projection.parameter_key(0, "w") != projection.parameter_key(1, "w")
    assert [python_hash(i, projection.parameter_key(0, "w")) for i in range(3)] == PINNED_HASHES


PINNED_HASHES = [2685647629, 1423173215, 4211073486]


def test_sketch_equals_the_definition():
    vectors = small_vectors(dtype=torch.float64)
    assert torch.allclose(projection.count_sketch(vectors, 64, seed=5), reference_sketch(vectors, 64, 5),
                          rtol=0, atol=1e-12)


def test_chunks_and_counter_blocks(monkeypatch):
    """A tensor longer than a chunk, and than a counter block (each block keyed apart)."""
    vectors = small_vectors(dtype=torch.float64)
    monkeypatch.setattr(projection, "SKETCH_CHUNK_ELEMENTS", 32)
    monkeypatch.setattr(projection, "COUNTER_BLOCK", 128)
    sketch = projection.count_sketch(vectors, 64, seed=5)
    assert torch.allclose(sketch, reference_sketch(vectors, 64, 5, block=128), rtol=0, atol=1e-12)


def test_linear_order_free_and_seeded():
    x, y = small_vectors(0, torch.float64), small_vectors(1, torch.float64)
    combined = {name: 2.5 * x[name] - 0.75 * y[name] for name in x}

    def sketch(v, seed=7):
        return projection.count_sketch(v, 256, seed)

    assert torch.allclose(sketch(combined), 2.5 * sketch(x) - 0.75 * sketch(y), rtol=0, atol=1e-12)
    assert torch.equal(sketch(x), sketch(dict(reversed(list(x.items())))))
    assert not torch.allclose(sketch(x), sketch(x, seed=8))
    renamed = {"other." + name: value for name, value in x.items()}
    assert not torch.allclose(sketch(x), sketch(renamed))


def test_float32_and_float64_inputs_give_the_same_projection():
    x64 = small_vectors(2, torch.float64)
    x32 = {name: value.float() for name, value in x64.items()}
    a, b = projection.count_sketch(x32, 256, 1), projection.count_sketch(x64, 256, 1)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    one_hot = {"layer.weight": torch.zeros(1, 30, 20), "layer.bias": torch.zeros(1, 20)}
    for i in (0, 17, 599):  # each coordinate lands in the same bucket with the same sign
        one_hot["layer.weight"].view(-1)[i] = 1.0
        assert torch.equal(projection.count_sketch(one_hot, 256, 1),
                           projection.count_sketch({k: v.double() for k, v in one_hot.items()}, 256, 1))
        one_hot["layer.weight"].view(-1)[i] = 0.0


SUBPROCESS = """
import sys, torch
from gradprobe.gradients import projection
g = torch.Generator().manual_seed(11)
vectors = {"a.weight": torch.randn(2, 300, 70, generator=g), "b": torch.randn(2, 5000, generator=g)}
torch.save(projection.count_sketch(vectors, 1024, seed=4), sys.argv[1])
"""


def test_same_sketch_in_another_process(tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path / "s.pt")], check=True, env=env)
    g = torch.Generator().manual_seed(11)
    vectors = {"a.weight": torch.randn(2, 300, 70, generator=g), "b": torch.randn(2, 5000, generator=g)}
    assert torch.equal(torch.load(tmp_path / "s.pt"), projection.count_sketch(vectors, 1024, seed=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sums_sketched_on_the_device_match_the_cpu():
    vectors = small_vectors(3)
    on_gpu = {name: value.cuda() for name, value in vectors.items()}
    key = projection.parameter_key(0, "x")
    assert torch.equal(projection.counter_hash(torch.arange(1000, device="cuda"), key).cpu(),
                       projection.counter_hash(torch.arange(1000), key))
    assert torch.allclose(projection.count_sketch(on_gpu, 512, 0), projection.count_sketch(vectors, 512, 0),
                          rtol=1e-6, atol=1e-6)


COSINES = (0.0, 0.6, -0.9)


def correlated_rows(seed: int, heavy_tailed: bool, n: int = 20_000) -> dict[str, torch.Tensor]:
    """Rows x, y_c for each c in COSINES with cos(x, y_c) = c exactly: Gaussian or Student-t
    (3 degrees of freedom) coordinates, stored as one matrix and one bias."""
    g = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        z = torch.randn(n, generator=g, dtype=torch.float64)
        if heavy_tailed:
            z = z / (torch.randn(3, n, generator=g, dtype=torch.float64).pow(2).sum(0) / 3).sqrt()
        return z

    x, z = draw(), draw()
    z -= (z @ x) / (x @ x) * x
    x, z = x / x.norm(), z / z.norm()
    rows = torch.stack([x] + [c * x + math.sqrt(1 - c**2) * z for c in COSINES])
    return {"w": rows[:, : n - 200].reshape(len(rows), 100, -1), "b": rows[:, n - 200 :]}


@pytest.mark.parametrize("heavy_tailed", [False, True])
def test_cosine_error_within_the_stated_bound(heavy_tailed):
    dim, draws = projection.MIN_DIM, 100
    bound = projection.cosine_error_bound(dim)
    errors = {c: [] for c in COSINES}
    covered = {c: 0 for c in COSINES}
    for seed in range(draws):
        sketch = projection.count_sketch(correlated_rows(seed, heavy_tailed), dim, seed)
        for k, c in enumerate(COSINES):
            estimate = projection.cosine(sketch[0], sketch[k + 1])
            errors[c].append(estimate - c)
            lo, hi = projection.cosine_interval(estimate, dim)
            covered[c] += lo <= c <= hi
    for c in COSINES:
        error = torch.tensor(errors[c])
        # 95% nominal; 100 draws have a binomial sd of 2.2 points, so 88% is three sd below
        assert (error.abs() <= bound).float().mean() >= 0.88, c
        assert covered[c] >= 0.88 * draws, c
        # first-order sd (1 - c^2) / sqrt(dim), and no bias beyond the noise of the mean
        sd = (1 - c**2) / math.sqrt(dim)
        assert float(error.pow(2).mean().sqrt()) <= 1.25 * sd + 1e-4, c
        assert abs(float(error.mean())) <= 4 * sd / math.sqrt(draws) + 1e-4, c


def test_from_sums_takes_device_and_dtype_free_mappings_and_respects_the_disk():
    sums = {"w": torch.randn(2, 300, 10, dtype=torch.float64), "b": torch.randn(2, 10).to(torch.bfloat16)}
    exact = task_grads.from_sums(sums, ["a", "b"], limit_mb=1.0)
    assert exact.kind == "exact" and exact.tensors["w"].dtype == torch.float32
    assert exact.info["exact_mb"] == pytest.approx(4 * 2 * 3010 / 1e6)
    full_disk = task_grads.from_sums(sums, ["a", "b"], limit_mb=1.0, free_disk_bytes=10**6)
    assert full_disk.kind == "projected" and "disk" in full_disk.reason
    info = full_disk.info
    assert (info["projection"], info["dim"], info["seed"]) == ("countsketch", projection.DEFAULT_DIM, 0)
    assert info["cosine_error_bound_95"] == pytest.approx(1.96 / math.sqrt(projection.DEFAULT_DIM), rel=1e-3)
    roomy = task_grads.from_sums(sums, ["a", "b"], limit_mb=1.0,
                                 free_disk_bytes=task_grads.DISK_MARGIN_BYTES + 10**6)
    assert roomy.kind == "exact"
