"""The TRL callback's cost: the probe's seconds against TRL's step time, on a small local model.

    python benchmarks/trl_probe_cost.py --steps 4 --hidden 256 --layers 4

Builds a char-level Qwen2 from config (no download), trains GRPO for --steps steps on a two-task
prompt set with the probe every step, and prints per step TRL's step_time (generation, reward,
forward and backward), the generation's share of it, gradprobe/seconds, and the probe against
the step's loss forward and backward (step_time less generation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (half per task)")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--intervals", default="none")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from gradprobe.demo.charlm import build_char_tokenizer, tiny_qwen2_config
    from gradprobe.integrations.trl import GradprobeCallback

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen2_config(
        len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=2))
    rows = [{"prompt": f"{a}+{a + 1}=", "task": "add"} for a in range(args.prompts // 2)] + \
           [{"prompt": f"say {chr(97 + a)}b:", "task": "echo"} for a in range(args.prompts // 2)]

    def reward(completions: list[str], **kwargs) -> list[float]:
        return [sum(c.isdigit() == (t == "add") for c in text) / max(1, len(text))
                for t, text in zip(kwargs["task"], completions)]

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.generations,
                        num_generations=args.generations, max_completion_length=args.completion_length,
                        max_steps=args.steps, logging_steps=1, report_to="none", use_cpu=not torch.cuda.is_available(),
                        bf16=False, save_strategy="no", disable_tqdm=True, log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    trainer.add_callback(GradprobeCallback(trainer=trainer, every_n_steps=1, intervals=args.intervals))
    generation_seconds: list[float] = []
    generate = trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        generation_seconds.append(time.perf_counter() - start)
        return out

    trainer._generate_and_score_completions = timed_generate
    trainer.train()
    history = trainer.state.log_history
    step_time = {e["step"]: e["step_time"] for e in history if "step_time" in e}
    probe = {e["step"]: e["gradprobe/seconds"] for e in history if "gradprobe/seconds" in e}
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.1f}M parameters, {args.prompts} prompts x {args.generations} completions of "
          f"<= {args.completion_length} tokens, intervals {args.intervals}")
    print("step  step_time_s  generation_s  loss_fwd_bwd_s  probe_s  probe/fwd_bwd")
    ratios = []
    for step, generation in zip(sorted(probe), generation_seconds):
        fwd_bwd = step_time[step] - generation
        ratios.append(probe[step] / fwd_bwd)
        print(f"{step:4d}  {step_time[step]:11.3f}  {generation:12.3f}  {fwd_bwd:14.3f}  {probe[step]:7.3f}  "
              f"{ratios[-1]:13.2f}")
    print(f"median probe / (step's forward+backward), after the first step: {statistics.median(ratios[1:] or ratios):.2f}")


if __name__ == "__main__":
    main()
