"""Benchmark of the gradient stage against a training step and against the naive way.

On the same model and rollouts, in one run:
  (a) plain: one forward+backward of the mixed loss (what a training step costs);
  (b) naive: one backward per task plus one backward per prompt (task norms, cosines and
      per-prompt norms the obvious way);
  (c) gradprobe: everything `gradprobe scan` does after the rollouts are read (the streaming
      gradient stage, the summary and the saved task gradients) in one pass (`--intervals none`);
      gradprobe-exact adds the second pass of exact intervals, gradprobe-sketch the count
      sketch of every unit in the one pass (sketched intervals); gradprobe-vmap forces the
      torch.func engine; gradprobe-ckpt runs the hooks with activation checkpointing;
  (d) opacus: the peer, Opacus ghost clipping's per-sample gradient norms (one forward and
      backward per micro-batch, linear layers), checked against gradprobe's per-completion norms.
Prints seconds, the ratio to plain and the peak memory of each (each method runs in its own
process so peak RSS is its own on the CPU; on CUDA, torch.cuda.max_memory_allocated).

    python benchmarks/grad_engine.py --model demo
    python benchmarks/grad_engine.py --model llama-20m --prompts 8 --tasks 4 --group-size 8
    python benchmarks/grad_engine.py --model qwen2-0.5b --device cuda --dtype bfloat16 ...
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time

import numpy as np
import torch

MODELS = {
    "demo": None,
    "llama-20m": dict(arch="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=8000),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
    # Qwen2-0.5B's width and vocabulary with 2 layers: the head (and the tied embedding) dominate.
    "qwen2-0.5b-2l": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                          num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                          tie_word_embeddings=True),
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
        spec.setdefault("tie_word_embeddings", False)
        config = config_class(max_position_embeddings=4096, **spec)
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


def gradprobe_stage(model, batch, layout, args, engine="auto", intervals="exact", checkpoint=False):
    """Everything `gradprobe scan` does after the rollouts are read: the gradient stage, the
    summary, the saved task gradients (projected when over the default limit)."""
    from gradprobe import task_grads
    from gradprobe.gradients.stage import StageSettings, run_gradient_stage
    from gradprobe.gradients.summary import summarise_gradients
    from gradprobe.pipeline import available_memory

    names = [n for n, _ in model.named_parameters()]
    settings = StageSettings(engine=engine, checkpoint_activations=checkpoint, chunk_size=args.chunk_size,
                             intervals=intervals)
    # The same planning as `gradprobe scan` (from free memory) unless --max-memory-gb says otherwise.
    budget = int(args.max_memory_gb * 2**30) if args.max_memory_gb else available_memory(next(model.parameters()).device)
    result, fallback = run_gradient_stage(model, names, batch, layout, settings, budget)
    summary = summarise_gradients(result, layout)
    task_grads.from_sums(result.paired_sums(), layout.tasks)  # what the scan saves, at its default limit
    return {"engine": result.engine, "passes": result.passes, "chunk_size": result.micro_batch,
            "fallback": fallback, "summary": summary}


def method_gradprobe_none(model, batch, layout, args):
    return gradprobe_stage(model, batch, layout, args, intervals="none")


def method_gradprobe_exact(model, batch, layout, args):
    return gradprobe_stage(model, batch, layout, args, intervals="exact")


def method_gradprobe_sketch(model, batch, layout, args):
    return gradprobe_stage(model, batch, layout, args, intervals="sketch")


def method_gradprobe_vmap(model, batch, layout, args):
    return gradprobe_stage(model, batch, layout, args, engine="vmap", intervals="none")


def method_gradprobe_checkpointed(model, batch, layout, args):
    return gradprobe_stage(model, batch, layout, args, intervals="none", checkpoint=True)


def completion_units(batch):
    """Every completion its own unit and its own 'prompt': per-completion squared norms."""
    from gradprobe.gradients.engine import Reductions, UnitBatch

    sequences = [s for seqs in batch.units for s in seqs]
    single = UnitBatch(batch.sequences, batch.coefficients, [[s] for s in sequences])
    n = len(sequences)
    reductions = Reductions([[u] for u in range(n)], torch.ones((1, n), dtype=torch.float64),
                            torch.ones((1, 1), dtype=torch.float64), [0] * n)
    return single, reductions


def gradprobe_completion_norms(model, batch, args):
    """gradprobe's hooked engine with completions as units: each completion's gradient norm."""
    from gradprobe.gradients.hooked import HookedEngine

    single, reductions = completion_units(batch)
    engine = HookedEngine(model, [n for n, _ in model.named_parameters() if ".mlp." in n or "_proj" in n])
    result = engine.run(single, reductions, max_tokens=args.micro_batch * 64, row_dots=False)
    return result.total_prompt_gram()[:, 0, 0].sqrt()


def method_opacus(model, batch, layout, args):
    """Opacus ghost clipping's per-sample (per-completion) gradient norms, one forward and one
    backward per micro-batch, over the decoder's linear layers (the layers both tools handle
    with the same rule: Opacus has no rule for Llama's RMSNorm)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from gradprobe.objective import token_logprobs

    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".mlp." in name or "_proj" in name)
    wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                                   use_ghost_clipping=True, strict=False)
    wrapped.train()  # Opacus captures activations only in training mode (these configs have no dropout)
    sequences = [s for seqs in batch.units for s in seqs]
    norms = []
    for start in range(0, len(sequences), args.micro_batch):
        ids, coef = padded(batch, sequences[start : start + args.micro_batch], args.device)
        logits = wrapped(ids, use_cache=False).logits
        (coef[:, 1:] * token_logprobs(logits.float(), ids, 1.0)).sum().backward()
        norms.append(wrapped.get_norm_sample().detach())
        wrapped.zero_grad(set_to_none=True)
    return {"norms": torch.cat(norms)}


METHODS = {"plain": method_plain, "naive": method_naive, "gradprobe": method_gradprobe_none,
           "gradprobe-exact": method_gradprobe_exact, "gradprobe-sketch": method_gradprobe_sketch,
           "gradprobe-vmap": method_gradprobe_vmap,
           "gradprobe-ckpt": method_gradprobe_checkpointed, "opacus": method_opacus}


def run_method(name, args, queue):
    try:
        measure_method(name, args, queue)
    except BaseException:
        import traceback

        queue.put({"method": name, "error": traceback.format_exc()})


def measure_method(name, args, queue):
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warm = argparse.Namespace(**{**vars(args), "prompts": min(args.prompts, 2)})
    METHODS[name](*prepare(warm), warm)  # warm-up on 2 prompts per task (allocator, kernels)
    model, batch, layout = prepare(args)
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
    extra.pop("summary", None)
    if name == "opacus":  # the peer's per-completion norms against gradprobe's, same rollouts (untimed)
        ours = gradprobe_completion_norms(build_model(args.model, args.device, getattr(torch, args.dtype)),
                                          prepare(args)[1], args).to(extra["norms"].dtype)
        theirs = extra.pop("norms").cpu()
        extra["norms_max_rel_diff"] = float(((ours - theirs).abs() / theirs.clamp_min(1e-30)).max())
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
    parser.add_argument("--methods", default="plain,naive,gradprobe,gradprobe-exact,opacus",
                        help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = {}
    for name in args.methods.split(","):
        queue = context.Queue()
        process = context.Process(target=run_method, args=(name, args, queue))
        process.start()
        result = queue.get()
        process.join()
        if "error" in result:  # reported, and the other methods still run
            print(f"{name} failed:\n{result['error']}", file=sys.stderr, flush=True)
            continue
        results[name] = result
        print(f"{name}: {result['seconds']:.3f} s, peak {result['peak_mib']:.1f} MiB", file=sys.stderr, flush=True)
    if not results:
        raise SystemExit("every method failed")
    first = next(iter(results.values()))
    flops = 6 * first["n_params"] * first["tokens"]
    print(f"model {args.model}: {first['n_params']:,} parameters, {first['tokens']:,} tokens, "
          f"{args.tasks} tasks x {args.prompts} prompts x {args.group_size} completions "
          f"(prompt {args.prompt_len}, completion <= {args.completion_len} tokens), {args.device} {args.dtype}")
    plain = results.get("plain")
    for name, r in results.items():
        rate = flops / r["seconds"] / 1e12
        ratio = f"  x{r['seconds'] / plain['seconds']:.2f} plain" if plain else ""
        plan = (f"   {r['engine']}: {r['chunk_size']} units per micro-batch, {r['passes']} pass(es)"
                if "passes" in r else "")
        check = (f"   norms vs gradprobe: max rel diff {r['norms_max_rel_diff']:.1e}"
                 if "norms_max_rel_diff" in r else "")
        print(f"  {name:<16} {r['seconds']:8.3f} s{ratio}   peak {r['peak_mib']:9.1f} MiB   "
              f"{rate:7.3f} TFLOP/s (6 x params x tokens){plan}{check}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
