"""Reproduce the shipped demo model and demo mix from a seed.

    python -m gradprobe.demo.train [--out DIR] [--mix PATH] [--seed N] [--steps N]

A tiny Llama over the character tokenizer of `gradprobe.demo.charlm` is trained with plain
supervised next-token loss on the answer tokens (+ EOS) of the synthetic tasks in
`gradprobe.demo.tasks`. Training aims at *partial* skill: the goal is that sampling at
temperature 1.0 gets every task right on roughly 20-80% of samples, so GRPO groups have mixed
rewards, with different levels per task.

How it gets there: the probability that one temperature-1 sample is exactly the reference answer
followed by EOS is ``exp(sum log p(answer + EOS | prompt))``, which one teacher-forced forward pass
gives without sampling. Every `EVAL_EVERY` steps this is averaged over a held-out validation set
per task; a task whose success probability has reached its target in `TARGETS` gets only
`REHEARSAL` of its normal share of the next batches (leaving it out entirely makes the tiny model
forget it within a few dozen steps). Training stops once every task lies within `TOLERANCE` of its
target, once no task is below its target, or at ``--steps``; the model kept is the evaluated one
whose *least* mixed task is most mixed (the chance that a group of 8 samples of a prompt has both
right and wrong answers, averaged over the task's prompts), so every task has a gradient. Everything is seeded (data, order, init), so the
same seed gives the same model on the same software and thread count.

The held-out demo mix (``mix.jsonl``: 48 prompts per task) is generated with a different random
stream and is disjoint from every training and validation prompt; `training_prompts(seed)`
regenerates the training prompts so tests can check that.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from gradprobe.demo.tasks import TASKS, Example

DEFAULT_SEED = 0
TRAIN_PER_TASK = 8000
VAL_PER_TASK = 160
MIX_PER_TASK = 48

# Target per-sample success probability of each task at temperature 1.0, and the band around it.
TARGETS = {"add": 0.45, "solve": 0.3, "reverse": 0.65, "count": 0.5}
TOLERANCE = 0.07

MAX_STEPS = 3000
BATCH_SIZE = 96
LEARNING_RATE = 1e-3
WARMUP_STEPS = 50
EVAL_EVERY = 20
REHEARSAL = 0.25  # batch weight of a task already at its target, relative to one below it

# The fields of the demo Llama that differ from `tiny_llama_config`'s defaults.
MODEL_OVERRIDES: dict[str, object] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _rng(kind: str, seed: int, task: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across runs.
    return random.Random(f"gradprobe-demo:{kind}:{seed}:{task}")


def training_examples(seed: int = DEFAULT_SEED) -> dict[str, list[Example]]:
    """The training examples of every task for a seed (duplicates possible, as drawn)."""
    return {name: spec.make_examples(_rng("train", seed, name), TRAIN_PER_TASK)
            for name, spec in TASKS.items()}


def training_prompts(seed: int = DEFAULT_SEED) -> set[str]:
    """Every prompt the model is trained on for a seed."""
    return {prompt for examples in training_examples(seed).values() for prompt, _ in examples}


def held_out_examples(kind: str, seed: int, per_task: int, exclude: set[str]) -> dict[str, list[Example]]:
    """`per_task` distinct examples per task whose prompts are not in `exclude`."""
    out: dict[str, list[Example]] = {}
    for name, spec in TASKS.items():
        rng = _rng(kind, seed, name)
        seen: set[str] = set()
        chosen: list[Example] = []
        for _ in range(1000):
            for prompt, answer in spec.make_examples(rng, per_task):
                if prompt not in exclude and prompt not in seen:
                    seen.add(prompt)
                    chosen.append((prompt, answer))
            if len(chosen) >= per_task:
                break
        if len(chosen) < per_task:
            raise RuntimeError(f"task {name!r}: cannot find {per_task} held-out prompts")
        out[name] = chosen[:per_task]
    return out


def validation_examples(seed: int, train: set[str]) -> dict[str, list[Example]]:
    return held_out_examples("val", seed, VAL_PER_TASK, train)


def mix_examples(seed: int, train: set[str], val: dict[str, list[Example]]) -> dict[str, list[Example]]:
    exclude = set(train) | {p for examples in val.values() for p, _ in examples}
    return held_out_examples("mix", seed, MIX_PER_TASK, exclude)


def write_mix(path: Path, mix: dict[str, list[Example]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for task, examples in mix.items():
            for prompt, answer in examples:
                handle.write(json.dumps({"task": task, "prompt": prompt, "answer": answer}) + "\n")


# --------------------------------------------------------------------------------------------
# Training (torch imported lazily so the helpers above stay cheap for tests).


def _encode(tokenizer, examples: list[Example]):
    """Left-padded ids, attention mask and loss mask (answer + EOS) for prompt+answer+EOS."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    rows = []
    for prompt, answer in examples:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [eos]
        rows.append((p, a))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        seq = p + a
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
        target[i, width - len(a):] = True
    return ids, mask, target


def _trim(ids, mask, target):
    """Drop the columns that are padding in every row (they are on the left)."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    return ids[:, start:], mask[:, start:], target[:, start:]


def answer_logprobs(model, ids, mask, target):
    """Sum of log p over the answer + EOS tokens of each row (teacher forced)."""
    import torch

    ids, mask, target = _trim(ids, mask, target)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logp * target[:, 1:]).sum(-1), target[:, 1:].sum()


def success_probabilities(model, encoded) -> dict:
    """Per task: the per-prompt probability that one temperature-1 sample is exactly right."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = {task: answer_logprobs(model, *tensors)[0].exp() for task, tensors in encoded.items()}
    model.train(was_training)
    return out


def _batch_shares(weight: dict[str, float], size: int) -> dict[str, int]:
    """Rows per task in a batch of `size`, proportional to `weight` (largest remainders)."""
    total = sum(weight.values())
    exact = {t: size * w / total for t, w in weight.items()}
    share = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: share[t] - exact[t])[: size - sum(share.values())]:
        share[t] += 1
    return share


def mixed_group_rate(success, group_size: int = 8) -> float:
    """Mean over prompts of P(a group of `group_size` samples has both rewards), given P(right)."""
    return float((1 - success**group_size - (1 - success) ** group_size).mean())


def build_model(tokenizer, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    from gradprobe.demo.charlm import tiny_llama_config

    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), **MODEL_OVERRIDES)
    return LlamaForCausalLM(config)


def train(seed: int, max_steps: int, log=print):
    """Train the demo model; returns (model, tokenizer, stats)."""
    import torch

    from gradprobe.demo.charlm import build_char_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    train_examples = training_examples(seed)
    train_set = {p for ex in train_examples.values() for p, _ in ex}
    val_examples = validation_examples(seed, train_set)

    tasks = list(TASKS)
    train_enc = {t: _encode(tokenizer, train_examples[t]) for t in tasks}
    val_enc = {t: _encode(tokenizer, val_examples[t]) for t in tasks}

    model = build_model(tokenizer, seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; tasks: {', '.join(tasks)}; targets {TARGETS}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))

    order_rng = random.Random(f"gradprobe-demo:order:{seed}")
    orders = {t: [] for t in tasks}

    def take(task: str, n: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if not orders[task]:
                orders[task] = list(range(TRAIN_PER_TASK))
                order_rng.shuffle(orders[task])
            picked.append(orders[task].pop())
        return picked

    weight = {t: 1.0 for t in tasks}
    accuracy: dict[str, float] = {}
    best = (-1.0, 0, {})  # (least mixed-group rate, step, state dict)
    start = time.perf_counter()
    step = 0
    stopped = "max steps"
    for step in range(1, max_steps + 1):
        share = _batch_shares(weight, BATCH_SIZE)
        parts = [tuple(x[take(t, n)] for x in train_enc[t]) for t, n in share.items() if n]
        width = max(p[0].shape[1] for p in parts)
        batch = []
        for k in range(3):
            cols = [torch.nn.functional.pad(p[k], (width - p[k].shape[1], 0)) for p in parts]
            batch.append(torch.cat(cols))
        total, count = answer_logprobs(model, *batch)
        loss = -total.sum() / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()

        if step % EVAL_EVERY == 0:
            probs = success_probabilities(model, val_enc)
            accuracy = {t: float(probs[t].mean()) for t in tasks}
            in_band = {t: abs(accuracy[t] - TARGETS[t]) <= TOLERANCE for t in tasks}
            balance = min(mixed_group_rate(probs[t]) for t in tasks)
            log(f"step {step:5d}  loss {loss.item():.3f}  "
                + "  ".join(f"{t} {accuracy[t]:.2f}{'*' if in_band[t] else ''}" for t in tasks)
                + f"  least mixed {balance:.2f}  [{time.perf_counter() - start:.0f}s]")
            if balance > best[0]:
                best = (balance, step, {k: v.clone() for k, v in model.state_dict().items()})
            if all(in_band.values()):
                stopped = "every task in its band"
                break
            if all(accuracy[t] >= TARGETS[t] for t in tasks):
                stopped = "every task at or above its target"
                break
            weight = {t: 1.0 if accuracy[t] < TARGETS[t] else REHEARSAL for t in tasks}
    elapsed = time.perf_counter() - start
    if best[2]:
        model.load_state_dict(best[2])
    probs = success_probabilities(model, val_enc)
    stats = {
        "steps": step,
        "kept_step": best[1],
        "stopped": stopped,
        "seconds": elapsed,
        "parameters": n_params,
        "expected_accuracy": {t: float(probs[t].mean()) for t in tasks},
        "mixed_group_rate": {t: mixed_group_rate(probs[t]) for t in tasks},
    }
    return model, tokenizer, stats


def save(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)  # safetensors: the only format transformers 5 writes
    tokenizer.save_pretrained(out)
    if not (out / "model.safetensors").exists():
        raise RuntimeError(f"{out}: no model.safetensors written")


def sampled_accuracy(model_dir: Path, mix: dict[str, list[Example]], samples: int = 8,
                     max_new_tokens: int = 10, seed: int = 0) -> tuple[dict[str, float], dict[str, float], float]:
    """Reload the saved model and sample `samples` completions per prompt at temperature 1.0.

    Returns per-task accuracy, per-task share of prompts whose group has mixed rewards, and the
    seconds one batched `generate` of all prompts took.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradprobe.rewards.string_match import exact, numeric

    rewards = {"exact": exact, "numeric": numeric}
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    rows = [(t, p, a) for t, examples in mix.items() for p, a in examples]
    batch = tokenizer([p for _, p, _ in rows], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    torch.manual_seed(seed)
    begin = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=samples,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - begin
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    scores: dict[str, list[float]] = {t: [] for t in mix}
    mixed: dict[str, list[bool]] = {t: [] for t in mix}
    for i, (task, _, answer) in enumerate(rows):
        group = [rewards[TASKS[task].reward](texts[i * samples + j], answer) for j in range(samples)]
        scores[task] += group
        mixed[task].append(0 < sum(group) < samples)
    accuracy = {t: sum(v) / len(v) for t, v in scores.items()}
    mixed_rate = {t: sum(v) / len(v) for t, v in mixed.items()}
    return accuracy, mixed_rate, seconds


def main(argv: list[str] | None = None) -> int:
    from gradprobe.demo import DEMO_MIX_PATH, DEMO_MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m gradprobe.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="model directory to write")
    parser.add_argument("--mix", type=Path, default=DEMO_MIX_PATH, help="demo mix file to write")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--steps", type=int, default=MAX_STEPS, help="at most this many steps")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    model, tokenizer, stats = train(args.seed, args.steps)
    save(model, tokenizer, args.out)
    train_set = training_prompts(args.seed)
    mix = mix_examples(args.seed, train_set, validation_examples(args.seed, train_set))
    write_mix(args.mix, mix)

    size = (args.out / "model.safetensors").stat().st_size
    print(f"stopped after {stats['steps']} steps ({stats['stopped']}) in {stats['seconds']:.0f}s, "
          f"kept step {stats['kept_step']}; "
          f"{stats['parameters']:,} parameters, model.safetensors {size / 1e6:.2f} MB")
    print("expected accuracy on validation prompts: "
          + ", ".join(f"{t} {v:.2f}" for t, v in stats["expected_accuracy"].items()))
    accuracy, mixed, seconds = sampled_accuracy(args.out, mix)
    print(f"sampled accuracy on {args.mix} (8 samples x {MIX_PER_TASK} prompts, T=1.0):")
    for task in accuracy:
        print(f"  {task:8s} {accuracy[task]:.2f}  (mixed groups {mixed[task]:.2f})")
    print(f"generate of {sum(len(v) for v in mix.values())} prompts x 8 samples: {seconds:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
