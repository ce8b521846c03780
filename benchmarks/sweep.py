"""Time and peak memory of the gradient stage against prompts per task and completion length.

Runs benchmarks/grad_engine.py's methods (each in its own process, as there) over a sweep of
one shape argument, prints a markdown table and writes a plot (matplotlib, the `plots` extra):

    python benchmarks/sweep.py --model demo --vary prompts --values 16,64,256
    python benchmarks/sweep.py --model demo --vary completion-len --values 32,128,512 --prompts 16

Memory flat in prompts per task is the engine's promise: the gradprobe rows' peak must not grow
with --prompts (only the rollouts themselves, a few MB, do).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grad_engine  # noqa: E402


def measure(args: argparse.Namespace, method: str) -> dict:
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=grad_engine.run_method, args=(method, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise SystemExit(f"{method} failed:\n{result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vary", choices=["prompts", "completion-len"], default="prompts")
    parser.add_argument("--values", default="16,64,256")
    parser.add_argument("--methods", default="plain,gradprobe,gradprobe-exact")
    parser.add_argument("--plot", default=None, help="PNG to write (default: benchmarks/sweep-<vary>.png)")
    for flag, default in (("--model", "demo"), ("--device", "cpu"), ("--dtype", "float32")):
        parser.add_argument(flag, default=default)
    for flag, default in (("--tasks", 4), ("--prompts", 16), ("--group-size", 8), ("--prompt-len", 16),
                          ("--completion-len", 32), ("--micro-batch", 64), ("--threads", 2), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--max-memory-gb", type=float, default=None)
    args = parser.parse_args()
    key = args.vary.replace("-", "_")
    rows = []
    for value in [int(v) for v in args.values.split(",")]:
        setattr(args, key, value)
        for method in args.methods.split(","):
            result = measure(args, method)
            rows.append((value, method, result["seconds"], result["peak_mib"], result["tokens"]))
            print(f"{args.vary}={value} {method}: {result['seconds']:.2f} s, peak {result['peak_mib']:.1f} MiB",
                  flush=True)
    print(f"\n| {args.vary} | method | tokens | seconds | x plain | peak MiB |\n|---|---|---|---|---|---|")
    plain = {v: s for v, m, s, _, _ in rows if m == "plain"}
    for value, method, seconds, peak, tokens in rows:
        ratio = f"{seconds / plain[value]:.2f}" if value in plain else "-"
        print(f"| {value} | {method} | {tokens:,} | {seconds:.2f} | {ratio} | {peak:.1f} |")
    _plot(rows, args)


def _plot(rows: list[tuple], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for method in args.methods.split(","):
        mine = [r for r in rows if r[1] == method]
        time_axis.plot([r[0] for r in mine], [r[2] for r in mine], marker="o", label=method)
        memory_axis.plot([r[0] for r in mine], [r[3] for r in mine], marker="o", label=method)
    for axis, label in ((time_axis, "seconds"), (memory_axis, "peak MiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel(args.vary)
        axis.set_ylabel(label)
        axis.legend()
    figure.suptitle(f"{args.model}: {args.tasks} tasks x {args.prompts} prompts x {args.group_size} "
                    f"completions, completion <= {args.completion_len} tokens (varying {args.vary})")
    figure.tight_layout()
    path = Path(args.plot or Path(__file__).parent / f"sweep-{args.vary}.png")
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
