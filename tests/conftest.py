"""Shared fixtures: tiny causal LMs with a char tokenizer, saved like real checkpoints, and mixes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM, GenerationConfig

    from gradprobe.demo.charlm import build_char_tokenizer, tiny_llama_config, tiny_qwen2_config

    tokenizer = build_char_tokenizer()
    make = tiny_llama_config if arch == "llama" else tiny_qwen2_config
    config = make(len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


MIX_ROWS = (
    [{"task": "add", "prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
     [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)]]
    + [{"task": "echo", "prompt": f"say {w}:", "answer": w} for w in ["ab", "cd", "ef", "gh", "ij", "kl"]]
    + [{"task": "chat", "prompt": [{"role": "user", "content": f"count {w}"}], "answer": str(len(w))}
       for w in ["aa", "bbb", "c", "dddd", "ee", "f"]]
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def tiny_mix(tmp_path) -> Path:
    return write_jsonl(tmp_path / "mix.jsonl", MIX_ROWS)


def policy_gradient_steps(model_dir: Path, rollouts: Path, task: str, out: Path, steps: int,
                          lr: float, optimiser=torch.optim.SGD) -> Path:
    """Plain policy-gradient steps on one task's rollouts, saved as a new checkpoint in `out`.

    loss = -mean_i (r_i - mean of r over i's group) * sum_j log pi(y_ij), completion tokens only.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [r for r in map(json.loads, rollouts.read_text().splitlines()) if r["task"] == task]
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r["reward"])
    advantage = torch.tensor([r["reward"] - sum(groups[r["prompt_id"]]) / len(groups[r["prompt_id"]])
                              for r in rows])
    sequences = [r["prompt_token_ids"] + r["completion_token_ids"] for r in rows]
    ids = torch.zeros((len(rows), max(map(len, sequences))), dtype=torch.long)
    mask = torch.zeros((len(rows), ids.shape[1] - 1))
    for i, (r, seq) in enumerate(zip(rows, sequences)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, len(r["prompt_token_ids"]) - 1 : len(seq) - 1] = 1  # positions that predict the completion
    step = optimiser(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        step.zero_grad()
        logp = torch.log_softmax(model(ids).logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
        (-(advantage * (logp * mask).sum(1)).mean()).backward()
        step.step()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out



DEMO_COMMAND = "gradprobe scan --demo"


@dataclass(frozen=True)
class DemoScan:
    """What `gradprobe scan --demo` wrote and printed (stdout, as piped)."""

    out: Path
    output: str


@pytest.fixture(scope="session")
def demo_scan(tmp_path_factory) -> DemoScan:
    """`gradprobe scan --demo` exactly as the README runs it, once per test session."""
    from typer.testing import CliRunner

    from gradprobe.cli import app

    folder = tmp_path_factory.mktemp("demo-scan")
    previous = Path.cwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(app, DEMO_COMMAND.split()[1:])
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output
    return DemoScan(folder / "gradprobe-scan-demo", result.stdout)


@pytest.fixture(scope="session")
def demo_scan_dir(demo_scan) -> Path:
    return demo_scan.out
