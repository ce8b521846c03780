"""Communication and time of the data-parallel gradient stage (run it under torchrun).

Each rank runs the streaming engine on its share of the prompts; the reductions are all-reduced
after each pass (gradprobe/distributed/data_parallel.py). This counts the payload bytes each
rank hands to the collectives (`Session.log`) and the micro-batches each rank ran, and prints,
on rank 0, one JSON line: bytes per micro-batch against the size of the gradient (the float32
gradient of the selected parameters, what a data-parallel training step all-reduces per step),
the ring all-reduce's bytes on the wire per rank (2 (N - 1) / N x payload), and the stage's time.

    torchrun --nproc-per-node 2 benchmarks/distributed.py --model demo
    torchrun --nproc-per-node 8 benchmarks/distributed.py --model qwen2-0.5b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from grad_engine import build_model, synthetic_rollouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="per task")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--intervals", default="exact")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from gradprobe.advantages import ADVANTAGES
    from gradprobe.distributed import open_session
    from gradprobe.distributed.data_parallel import DataParallel
    from gradprobe.gradients.layout import build_units
    from gradprobe.gradients.params import select_parameters
    from gradprobe.gradients.stage import StageSettings, run_gradient_stage
    from gradprobe.objective import LOSSES
    from gradprobe.pipeline import available_memory
    from gradprobe.scoring import assign_advantages

    with open_session(args.device) as session:
        device = f"cuda:{session.local_rank}" if args.device == "cuda" else "cpu"
        model = build_model(args.model, device, getattr(torch, args.dtype))
        rollouts = assign_advantages(synthetic_rollouts(model.config.vocab_size, args), ADVANTAGES.get("grpo"))
        batch, layout = build_units(rollouts, LOSSES.get("grpo"), args.completion_len)
        names = select_parameters(model, ["all"])
        micro_batches = [0]

        def count(_: int) -> None:
            micro_batches[0] += 1

        settings = StageSettings(intervals=args.intervals)
        budget = available_memory(next(model.parameters()).device)
        parallel = DataParallel(session) if session.is_distributed else None
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result, _ = run_gradient_stage(model, names, batch, layout, settings, budget, count, parallel=parallel)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if session.is_writer:
            gradient_bytes = 4 * sum(result.group_sizes)
            payload = session.log.total_bytes
            world = session.world
            print(json.dumps({
                "model": args.model, "device": args.device, "processes": world, "tasks": args.tasks,
                "prompts": args.tasks * args.prompts, "group_size": args.group_size, "intervals": args.intervals,
                "gradient_bytes": gradient_bytes,
                "micro_batches_rank0": micro_batches[0],  # both passes
                "payload_bytes_rank0": payload,
                "payload_by_kind": session.log.bytes_by_kind,
                "payload_per_micro_batch": payload / max(1, micro_batches[0]),
                "payload_per_micro_batch_over_gradient": payload / max(1, micro_batches[0]) / gradient_bytes,
                "ring_wire_bytes_per_rank": 2 * (world - 1) / world * payload if world > 1 else 0,
                "stage_seconds": round(seconds, 3),
            }))


if __name__ == "__main__":
    main()
