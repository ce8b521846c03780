"""--adapter (PEFT LoRA) gradients against plain autograd, and hub ids from the local cache only."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradprobe.cli import app
from gradprobe.errors import UserInputError
from gradprobe.model_loading import resolve_model_path

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, config).save_pretrained(path)
    return path


def reference_task_gradients(model_dir: Path, adapter: Path, rows: list[dict]) -> dict[str, torch.Tensor]:
    """g_t over the LoRA parameters by plain float64 autograd, `grpo` loss (docs/metrics.md)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter),
                                      is_trainable=True).double()
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    grads = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        loss = 0.0
        for r in mine:
            ids = torch.tensor([r["prompt_token_ids"] + r["completion_token_ids"]])
            logp = torch.log_softmax(model(ids, use_cache=False).logits[0], -1)  # temperature 1
            start = len(r["prompt_token_ids"])
            token_logp = sum(logp[start + j - 1, t] for j, t in enumerate(r["completion_token_ids"]))
            loss = loss - r["advantage"] * token_logp / (len(mine) * r["n_tokens"])
        grads[task] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    return grads


def test_adapter_gradients_equal_autograd_over_lora(tiny_llama, tiny_mix, lora_adapter, tmp_path):
    out = tmp_path / "scan"
    result = run("scan", tiny_llama, tiny_mix, "--adapter", lora_adapter, "--out", out, "-k", "3",
                 "--max-new-tokens", "4", "--prompts-per-task", "2", "--advantage", "none",
                 "--reward", "regex:[a-m]", "--no-stats")
    assert result.exit_code == 0, result.output
    document = json.loads((out / "scan.json").read_text())
    assert document["config"]["params"] == ["lora"]  # the default with an adapter
    assert "proxy_fidelity" not in document  # "all" trainable parameters are the adapter's
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    reference = reference_task_gradients(tiny_llama, lora_adapter, rows)
    n_lora = next(iter(reference.values())).numel()
    assert document["model"]["n_selected_parameters"] == n_lora < document["model"]["n_parameters"]
    assert set(document["modules"]) == {"block0.attention", "block1.attention"}
    assert any(g.norm() > 0 for g in reference.values())
    for task, g in reference.items():
        assert document["tasks"][task]["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-4, abs=1e-9)
    tasks = document["cosine"]["tasks"]
    a, b = reference[tasks[0]], reference[tasks[1]]
    if a.norm() > 0 and b.norm() > 0:
        assert document["cosine"]["matrix"][0][1] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-4)
    # The fingerprint covers the adapter: the base model alone fingerprints differently.
    from gradprobe.model_loading import fingerprint

    assert document["model"]["fingerprint"] != fingerprint(Path(tiny_llama))


def test_adapter_errors(tiny_llama, tiny_mix, lora_adapter, tmp_path, monkeypatch):
    result = run("scan", tiny_llama, tiny_mix, "--adapter", tiny_llama, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a PEFT adapter directory" in result.output
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    result = run("scan", tiny_llama, tiny_mix, "--adapter", lora_adapter, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "pip install 'gradprobe[peft]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_hub_ids_resolve_from_the_local_cache_only(tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llama, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("tiny-org/tiny-llama") == repo / "snapshots" / commit
    with pytest.raises(UserInputError, match="not in the local Hugging Face cache.*never downloads"):
        resolve_model_path("tiny-org/not-cached")
    mix = tmp_path / "m.jsonl"
    mix.write_text('{"task": "a", "prompt": [{"role": "user", "content": "hi"}], "answer": "1"}\n')
    result = run("mix", "inspect", mix, "--model", "tiny-org/tiny-llama")
    assert result.exit_code == 0 and "user: hi" in result.output, result.output
    result = run("mix", "inspect", mix, "--model", "tiny-org/not-cached")
    assert result.exit_code == 2 and "local Hugging Face cache" in result.output
