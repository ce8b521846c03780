#!/usr/bin/env bash
# The GPU benchmark, one prepared script for a short loan of a GPU machine (an H200 here):
#  1. the gradient-stage comparison in bf16 on CUDA for Qwen2-0.5B built from its config
#     (random weights; the cost does not depend on them) at 4 tasks x 64 prompts x 8 completions
#     x 512 tokens: plain training step, gradprobe one pass, exact intervals, sketch, Opacus;
#  2. the same at 16 and 256 prompts per task (memory flat in prompts);
#  3. `gradprobe plan` for Qwen2-7B (4 tasks, all parameters, 64 x 8 x 1024) on one 141 GB (131.3 GiB) GPU.
# Results go to $OUT (or ./gpu-results) as text; copy the figures to benchmarks/RESULTS.md.
#
#     bash benchmarks/gpu.sh            # from the repository root, with gradprobe installed
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee -a "$out/device.txt"

shape=(--model qwen2-0.5b --device cuda --dtype bfloat16 --tasks 4 --group-size 8 --prompt-len 256
       --completion-len 512 --micro-batch 16)
python benchmarks/grad_engine.py "${shape[@]}" --prompts 64 \
    --methods plain,gradprobe,gradprobe-exact,opacus 2>&1 | grep -v Warning | tee "$out/qwen2-0.5b-64.txt"
python benchmarks/sweep.py "${shape[@]}" --vary prompts --values 16,256 --methods plain,gradprobe \
    --plot "$out/sweep-prompts-gpu.png" 2>&1 | grep -v Warning | tee "$out/sweep-prompts.txt"

config_dir="$(mktemp -d)"
trap 'rm -rf "$config_dir"' EXIT
python - "$config_dir" <<'PY'
import sys
from transformers import Qwen2Config
Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
            tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(sys.argv[1])
PY
gradprobe plan "$config_dir" --tasks 4 --prompts-per-task 64 --group-size 8 --prompt-len 256 \
    --completion-len 1024 --dtype bfloat16 --device-memory 131.3 | tee "$out/plan-qwen2-7b.txt" || true
