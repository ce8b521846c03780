"""Benchmark of saving task gradients: the count sketch against the older dense Gaussian projection.

Random float32 task sums [T, *shape] with the parameter names and shapes of a model built from its
config on the meta device (no weights), projected as `task_grads.from_sums` projects them:

  llama-5m    hidden 256, 4 layers, vocabulary 8000, tied embeddings (5.2M parameters), 4 tasks:
              the case where the Gaussian took 76.8 s in a scan (issue 12);
  qwen2-0.5b  Qwen2-0.5B's config (494M parameters), 2 tasks (4 GB of sums).

Each projection runs --repeats times (median and range printed). The Gaussian at 0.5B would take
hours: it is timed on the first --gaussian-sample-elements elements of the parameters (in name
order) and scaled by the parameter count, its cost being linear in it; --gaussian-full runs it
whole.

    python benchmarks/task_grads.py --model llama-5m --tasks 4
    python benchmarks/task_grads.py --model qwen2-0.5b --tasks 2
    python benchmarks/task_grads.py --model qwen2-0.5b --tasks 2 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

MODELS = {
    "llama-5m": dict(arch="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=8000, tie_word_embeddings=True),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def parameter_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the model's parameters, from its config on the meta device."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(MODELS[name])
    config_class = LlamaConfig if spec.pop("arch") == "llama" else Qwen2Config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_class(**spec))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def random_sums(shapes: dict[str, tuple[int, ...]], tasks: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)
    return {n: torch.randn((tasks, *shape), generator=generator, device=device) for n, shape in shapes.items()}


def leading_elements(sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """The first `count` elements of the sums, parameter by parameter in name order."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(sums):
        flat = sums[name].reshape(sums[name].shape[0], -1)
        out[name] = flat[:, :count]
        count -= out[name].shape[1]
        if count <= 0:
            break
    return out


def timed(function, repeats: int, device: str) -> list[float]:
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds):.3f} s (range {min(seconds):.3f}-{max(seconds):.3f}, n={len(seconds)})"


def main() -> None:
    from gradprobe import task_grads
    from gradprobe.gradients import projection

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-5m", choices=list(MODELS))
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gaussian-repeats", type=int, default=1)
    parser.add_argument("--gaussian-sample-elements", type=int, default=None,
                        help="time the Gaussian on this many leading elements and scale (default: all of llama-5m, "
                             "4M elements of anything larger)")
    parser.add_argument("--gaussian-full", action="store_true", help="run the Gaussian on every parameter")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shapes = parameter_shapes(args.model)
    n_parameters = sum(torch.Size(s).numel() for s in shapes.values())
    sums = random_sums(shapes, args.tasks, args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}: {n_parameters:,} parameters in {len(shapes)} tensors, {args.tasks} tasks, "
          f"{args.device}, {args.threads} threads, torch {torch.__version__}, load average {load:.1f}")

    names = ["the pipeline's task_grads.from_sums (count sketch to 16384, limit 0 MB)"]
    results = [timed(lambda: task_grads.from_sums(sums, [f"t{i}" for i in range(args.tasks)], 0.0),
                     args.repeats, args.device)]
    for dim in (projection.DEFAULT_DIM, 2048):
        names.append(f"count sketch, dim {dim}")
        results.append(timed(lambda: projection.count_sketch(sums, dim, 0), args.repeats, args.device))
    for name, seconds in zip(names, results):
        print(f"  {name}: {summary(seconds)}")

    sample = args.gaussian_sample_elements or (n_parameters if n_parameters <= 8_000_000 else 4_000_000)
    if args.gaussian_full or sample >= n_parameters:
        seconds = timed(lambda: projection.gaussian_projection(sums, 2048, 0), args.gaussian_repeats, args.device)
        print(f"  dense Gaussian, dim 2048 (scans before the count sketch): {summary(seconds)}")
        gaussian = statistics.median(seconds)
    else:
        part = leading_elements(sums, sample)
        seconds = timed(lambda: projection.gaussian_projection(part, 2048, 0), args.gaussian_repeats, args.device)
        gaussian = statistics.median(seconds) * n_parameters / sample
        print(f"  dense Gaussian, dim 2048, on the first {sample:,} elements: {summary(seconds)}; "
              f"scaled to all {n_parameters:,}: {gaussian:.0f} s ({gaussian / 3600:.2f} h)")
    sketch = statistics.median(results[1])
    print(f"  Gaussian / count sketch (dim {projection.DEFAULT_DIM}): {gaussian / sketch:.0f}x; count sketch "
          f"{sketch / (n_parameters * args.tasks) * 1e9:.2f} ns per parameter per task")


if __name__ == "__main__":
    main()
