"""Benchmark of the gradient stage against a training step and against the naive way.

On the same model and rollouts, in one run:
  (a) plain: one forward+backward of the mixed loss (what a training step costs);
  (b) naive: one backward per task plus one backward per prompt (task norms, cosines and
      per-prompt norms the obvious way);
  (c) gradprobe: the gradient stage as `gradprobe scan` runs it (engine `auto`: per-unit gradients
      from module hooks in one forward+backward per micro-batch, Grams within tasks per module
      group, task sums) and the estimators over it; gradprobe-vmap and gradprobe-ckpt force the
      torch.func engine (without and with activation checkpointing).
Prints seconds, c/a, c/b and the peak memory of each (each method runs in its own process so
peak RSS is its own on the CPU; on CUDA, torch.cuda.max_memory_allocated).

    python benchmarks/grad_engine.py --model demo
    python benchmarks/grad_engine.py --model llama-20m --prompts 8 --tasks 4 --group-size 8
    python benchmarks/grad_engine.py --model qwen2-0.5b --device cuda --dtype bfloat16 ...
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import numpy as np
import torch

MODELS = {
    "demo": None,
    "llama-20m": dict(arch="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=8000),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "qwen2-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
}


def build_model(name: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if name == "demo":
        from gradprobe.demo import DEMO_MODEL_DIR

        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=dtype)
    else:
        spec = dict(MODELS[name])
        config_class = LlamaConfig if spec.pop("arch") == "llama" else Qwen2Config
        config = config_class(max_position_embeddings=4096, tie_word_embeddings=False, **spec)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # plain and naive keep the default attention (sdpa), as a trainer would; the engine switches
    # itself to eager attention, which vmap batches (docs/engine.md).
    return model.to(device).eval()


def synthetic_rollouts(vocab: int, args):
    """Random token rollouts with rewards in {0, 1} (half the prompts' groups mixed)."""
    from gradprobe.rollouts import Rollout

    rng = np.random.default_rng(args.seed)
    rollouts = []
    for t in range(args.tasks):
        for p in range(args.prompts):
            prompt = rng.integers(3, vocab, args.prompt_len).tolist()
            rewards = rng.integers(0, 2, args.group_size).astype(float)
            for k in range(args.group_size):
                n = int(rng.integers(args.completion_len // 2, args.completion_len + 1))
                rollouts.append(Rollout(f"task{t}", f"t{t}p{p}", k, "", "", prompt,
                                        rng.integers(3, vocab, n).tolist(), reward=float(rewards[k])))
    return rollouts


def prepare(args):
    from gradprobe.advantages import ADVANTAGES
    from gradprobe.gradients.layout import build_units
    from gradprobe.objective import LOSSES
    from gradprobe.scoring import assign_advantages

    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, args.device, dtype)
    rollouts = assign_advantages(synthetic_rollouts(model.config.vocab_size, args), ADVANTAGES.get("grpo"))
    batch, layout = build_units(rollouts, LOSSES.get("grpo"), args.completion_len)
    return model, batch, layout


def padded(batch, seqs, device):
    length = max(len(batch.sequences[s]) for s in seqs)
    ids = torch.zeros((len(seqs), length), dtype=torch.long)
    coef = torch.zeros((len(seqs), length))
    for i, s in enumerate(seqs):
        ids[i, : len(batch.sequences[s])] = torch.tensor(batch.sequences[s])
        coef[i, : len(batch.sequences[s])] = torch.tensor(batch.coefficients[s])
    return ids.to(device), coef.to(device)


def loss_of(model, batch, seqs, device, micro_batch):
    """Backward of sum_j coef_j log pi over `seqs` in micro-batches (gradients accumulate)."""
    from gradprobe.objective import token_logprobs

    for start in range(0, len(seqs), micro_batch):
        ids, coef = padded(batch, seqs[start : start + micro_batch], device)
        logits = model(ids, use_cache=False).logits
        logp = token_logprobs(logits.float(), ids, 1.0)
        (coef[:, 1:] * logp).sum().backward()


def method_plain(model, batch, layout, args):
    model.requires_grad_(True)
    unit_task = layout.prompt_task[layout.unit_prompt]
    weights = layout.task_weights / layout.prompts_per_task  # L = sum_t w_t (1/m_t) sum_p (...)
    for u, seqs in enumerate(batch.units):
        for s in seqs:
            batch.coefficients[s] = [c * weights[unit_task[u]] for c in batch.coefficients[s]]
    every = [s for seqs in batch.units for s in seqs]
    loss_of(model, batch, every, args.device, args.micro_batch)


def method_naive(model, batch, layout, args):
    model.requires_grad_(True)
    params = [p for p in model.parameters()]
    for t in range(len(layout.tasks)):
        seqs = [s for u, q in enumerate(batch.units) if layout.prompt_task[layout.unit_prompt[u]] == t for s in q]
        model.zero_grad(set_to_none=True)
        loss_of(model, batch, seqs, args.device, args.micro_batch)
        _ = sum(float((p.grad.float() ** 2).sum()) for p in params if p.grad is not None)
    for p in range(len(layout.prompt_keys)):
        seqs = [s for u, q in enumerate(batch.units) if layout.unit_prompt[u] == p for s in q]
        model.zero_grad(set_to_none=True)
        if seqs:
            loss_of(model, batch, seqs, args.device, args.micro_batch)


def method_gradprobe(model, batch, layout, args, engine="auto", checkpoint=False):
    from gradprobe import task_grads
    from gradprobe.gradients.stage import StageSettings, run_gradient_stage
    from gradprobe.gradients.summary import summarise_gradients
    from gradprobe.pipeline import available_memory

    names = [n for n, _ in model.named_parameters()]
    settings = StageSettings(engine=engine, checkpoint_activations=checkpoint, chunk_size=args.chunk_size)
    # The same planning as `gradprobe scan` (from free memory) unless --max-memory-gb says otherwise.
    budget = int(args.max_memory_gb * 2**30) if args.max_memory_gb else available_memory(next(model.parameters()).device)
    result, fallback = run_gradient_stage(model, names, batch, layout, settings, budget)
    summarise_gradients(result, layout)
    task_grads.from_sums(result.sums, layout.tasks)  # what the scan saves, at its default limit
    return {"engine": result.engine, "passes": result.passes, "chunk_size": result.chunk_size,
            "fallback": fallback}


def method_gradprobe_vmap(model, batch, layout, args):
    return method_gradprobe(model, batch, layout, args, engine="vmap")


def method_gradprobe_checkpointed(model, batch, layout, args):
    return method_gradprobe(model, batch, layout, args, engine="vmap", checkpoint=True)


METHODS = {"plain": method_plain, "naive": method_naive, "gradprobe": method_gradprobe,
           "gradprobe-vmap": method_gradprobe_vmap, "gradprobe-ckpt": method_gradprobe_checkpointed}


def run_method(name, args, queue):
    torch.set_num_threads(args.threads)
    model, batch, layout = prepare(args)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    METHODS[name](model, batch, layout, args)  # warm-up (allocator, kernels)
    model.zero_grad(set_to_none=True)
    model, batch, layout = prepare(args)  # fresh coefficients for `plain`, which rescales them
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    extra = METHODS[name](model, batch, layout, args) or {}
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    n_params = sum(p.numel() for p in model.parameters())
    tokens = sum(len(s) for s in batch.sequences)
    queue.put({"method": name, "seconds": seconds, "peak_mib": peak, "n_params": n_params,
               "tokens": tokens, **extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per task")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--completion-len", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: planned as scan does")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="memory the gradient stage plans for, as scan's --max-memory (default: free memory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="plain,naive,gradprobe",
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = {}
    for name in args.methods.split(","):
        queue = context.Queue()
        process = context.Process(target=run_method, args=(name, args, queue))
        process.start()
        results[name] = queue.get()
        process.join()
    first = next(iter(results.values()))
    flops = 6 * first["n_params"] * first["tokens"]
    print(f"model {args.model}: {first['n_params']:,} parameters, {first['tokens']:,} tokens, "
          f"{args.tasks} tasks x {args.prompts} prompts x {args.group_size} completions, {args.device} {args.dtype}")
    for name, r in results.items():
        rate = flops / r["seconds"] / 1e12
        plan = (f"   {r['engine']}: {r['chunk_size']} units per call, {r['passes']} pass(es)"
                if "passes" in r else "")
        print(f"  {name:<15} {r['seconds']:8.3f} s   peak {r['peak_mib']:9.1f} MiB   "
              f"{rate:7.3f} TFLOP/s (6 x params x tokens){plan}")
    if "gradprobe" in results and "plain" in results:
        print(f"  c/a = {results['gradprobe']['seconds'] / results['plain']['seconds']:.2f}", end="")
    if "gradprobe" in results and "naive" in results:
        print(f"   c/b = {results['gradprobe']['seconds'] / results['naive']['seconds']:.2f}", end="")
    print()
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
