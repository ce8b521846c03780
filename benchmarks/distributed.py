"""Communication, memory and time of the data-parallel gradient stage (run it under torchrun).

Each rank runs the streaming engine on its share of the prompts (gradprobe/distributed/). With
`--shard none` the sums are whole on every rank and all-reduced after each pass; with `sums` they
are sharded, reduce-scattered per micro-batch step, and the exact pass all-gathers its targets;
with `params` the weights are sharded with FSDP2 too, which all-gathers them in every forward and
backward. This counts the payload bytes each rank hands to gradprobe's collectives
(`Session.log`, with the ring algorithms' bytes on the wire per rank) and FSDP2's gathers
(`torch.distributed.all_gather_single`, counted by wrapping it), the steps each rank ran, and
prints, on rank 0, one JSON line: bytes per micro-batch step against the size of the gradient
(the float32 gradient of the selected parameters, what a data-parallel training step exchanges
per step), the sums each rank holds, and the stage's time.

    torchrun --nproc-per-node 2 benchmarks/distributed.py --model demo --shard params
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
    parser.add_argument("--shard", default="none", choices=["none", "sums", "params"])
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

    fsdp_gathered = [0]
    gather = torch.distributed.all_gather_single

    def counted(output, input_tensor, *rest, **kwargs):  # FSDP2's gathers of the weights
        fsdp_gathered[0] += input_tensor.numel() * input_tensor.element_size()
        return gather(output, input_tensor, *rest, **kwargs)

    torch.distributed.all_gather_single = counted
    with open_session(args.device) as session:
        device = f"cuda:{session.local_rank}" if args.device == "cuda" else "cpu"
        model = build_model(args.model, device, getattr(torch, args.dtype))
        if args.shard == "params" and session.is_distributed:
            from gradprobe.distributed.sharded import shard_parameters

            shard_parameters(model, session)
        rollouts = assign_advantages(synthetic_rollouts(model.config.vocab_size, args), ADVANTAGES.get("grpo"))
        batch, layout = build_units(rollouts, LOSSES.get("grpo"), args.completion_len)
        names = select_parameters(model, ["all"])
        micro_batches = [0]

        def count(_: int) -> None:
            micro_batches[0] += 1

        settings = StageSettings(intervals=args.intervals, engine="hooks", shard=args.shard)
        budget = available_memory(next(model.parameters()).device)
        sharded = args.shard != "none"
        parallel = DataParallel(session, sharded, sharded) if session.is_distributed else None
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result, _ = run_gradient_stage(model, names, batch, layout, settings, budget, count, parallel=parallel)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if session.is_writer:
            gradient_bytes = 4 * sum(result.group_sizes)
            world = session.world
            steps = micro_batches[0]  # rank 0's real steps, both passes (lockstep: every rank's count)
            if sharded and parallel is not None:
                steps = len(parallel._plans[0]) * result.passes
            # the wrapper also counted gradprobe's own gathers (targets, task gradients)
            fsdp_gathered[0] -= sum(v for k, v in session.log.bytes_by_kind.items() if "all-gather" in k)
            wire = session.log.wire_bytes + (world - 1) * fsdp_gathered[0]
            sums_bytes = sum(v.numel() * v.element_size() for v in (result.sums or {}).values())
            print(json.dumps({
                "model": args.model, "device": args.device, "processes": world, "shard": args.shard,
                "tasks": args.tasks, "prompts": args.tasks * args.prompts, "group_size": args.group_size,
                "intervals": args.intervals, "gradient_bytes": gradient_bytes,
                "steps_per_rank": steps,  # micro-batch steps, both passes
                "payload_bytes_rank0": session.log.total_bytes,
                "payload_by_kind": session.log.bytes_by_kind,
                "fsdp_gather_payload_bytes_rank0": fsdp_gathered[0],
                "wire_bytes_per_rank": round(wire),
                "wire_per_step_over_gradient": round(wire / max(1, steps) / gradient_bytes, 3),
                "sums_bytes_per_rank": sums_bytes,
                "sums_per_rank_over_gradient": round(sums_bytes / gradient_bytes, 3),
                "stage_seconds": round(seconds, 3),
            }))


if __name__ == "__main__":
    main()
