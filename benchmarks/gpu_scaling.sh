#!/usr/bin/env bash
# Scaling of the data-parallel gradient stage over 1, 2, 4 and 8 GPUs of one machine, ready for a
# GPU loan: Qwen2-0.5B built from its config (random weights; the cost does not depend on them)
# in bf16, 4 tasks x 32 prompts x 8 completions x 256 tokens, exact intervals, each rank on its
# share of the prompts (nccl). One JSON line per GPU count (benchmarks/distributed.py: seconds
# of the stage, micro-batches on rank 0, bytes handed to the all-reduces against the gradient's
# size, FSDP2's gathers, sums per rank). SHARD (none, sums or params; default: none and params,
# one line each) chooses how the ranks share the scan. Results go to $OUT (or ./gpu-results);
# copy the figures to benchmarks/RESULTS.md.
#
#     bash benchmarks/gpu_scaling.sh                # from the repository root, with gradprobe installed
#     SHARD=params bash benchmarks/gpu_scaling.sh   # FSDP2 weights and sharded sums only
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
gpus=$(python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/scaling-device.txt"
shape=(--model qwen2-0.5b --device cuda --dtype bfloat16 --tasks 4 --prompts 32 --group-size 8
       --prompt-len 128 --completion-len 256 --intervals exact)
read -r -a modes <<< "${SHARD:-none params}"
for n in 1 2 4 8; do
    if [ "$n" -gt "$gpus" ]; then
        echo "skipping $n GPUs: this machine has $gpus" | tee -a "$out/scaling.jsonl.log"
        continue
    fi
    for shard in "${modes[@]}"; do
        if [ "$n" -eq 1 ] && [ "$shard" != "${modes[0]}" ]; then continue; fi  # one GPU shares nothing
        torchrun --standalone --nproc-per-node "$n" benchmarks/distributed.py "${shape[@]}" --shard "$shard" \
            2> >(grep -v Warning >> "$out/scaling.jsonl.log") | tee -a "$out/scaling.jsonl"
    done
done
