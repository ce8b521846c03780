"""The scan planner: its formulas by hand, its activation estimate against what autograd saves,
the plans at real scale (Qwen2-0.5B fits and is flat in prompts per task; Qwen2-7B needs host
sums or says truthfully what would fit), and `gradprobe plan`'s exit codes and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from typer.testing import CliRunner

from gradprobe import schema
from gradprobe.cli import app
from gradprobe.gradients.plan import (
    Architecture,
    ModelShape,
    PlanSettings,
    RolloutShape,
    activation_bytes_per_token,
    layer_activation_bytes_per_token,
    linear_work_bytes,
    logits_bytes_per_completion_token,
    meta_model,
    plan_for_model,
    plan_scan,
    subset_selections,
)
from gradprobe.gradients.params import select_parameters

GiB = 1 << 30
runner = CliRunner()


def qwen2_05b_config() -> Qwen2Config:
    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768)


def qwen2_7b_config() -> Qwen2Config:
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768)


def small_llama_config(**overrides) -> LlamaConfig:
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False, max_position_embeddings=64)
    return LlamaConfig(**{**fields, **overrides})


class Planned:
    """A model built once on the meta device, planned under many settings."""

    def __init__(self, config) -> None:
        model = meta_model(config)
        self.shape = ModelShape.of(model)
        self.everything = select_parameters(model, ["all"])
        self.subsets = subset_selections(model)

    def plan(self, rollout: RolloutShape, settings: PlanSettings, selected=None):
        return plan_scan(self.shape, selected or self.everything, rollout, settings, self.subsets)


@pytest.fixture(scope="module")
def qwen05() -> Planned:
    return Planned(qwen2_05b_config())


@pytest.fixture(scope="module")
def qwen7() -> Planned:
    return Planned(qwen2_7b_config())


def bf16(device_gib: float, host_gib: float = 256, **changes) -> PlanSettings:
    return PlanSettings(dtype_bytes=2, device_memory=int(device_gib * GiB), host_memory=int(host_gib * GiB),
                        **changes)


# ----------------------------------------------------------------------------- real scale


@pytest.mark.parametrize("intervals", ["exact", "none", "sketch"])
def test_qwen2_05b_fits_and_is_flat_in_prompts_per_task(qwen05, intervals):
    peaks = {}
    for prompts in (16, 64, 256):
        plan = qwen05.plan(RolloutShape(4, prompts, 8, 256, 512), bf16(80, intervals=intervals))
        assert plan.fits and plan.sums_location == "device" and plan.advice is None
        assert plan.passes == (2 if intervals == "exact" else 1)
        assert plan.micro_batch_prompts >= 1
        assert plan.micro_batches == math.ceil(4 * prompts / plan.micro_batch_prompts)
        assert plan.peak_bytes <= plan.usable_device_memory
        peaks[prompts] = plan.peak_bytes
    assert peaks[256] < 1.10 * peaks[16], peaks


def test_qwen2_05b_buffers_at_the_readme_shape(qwen05):
    plan = qwen05.plan(RolloutShape(4, 64, 8, 256, 512), bf16(80))
    parameters = 494_032_768  # Qwen2-0.5B, tied head counted once
    assert plan.total_parameters == plan.selected_parameters == parameters
    assert plan.buffers["model weights"].bytes == parameters * 2
    assert plan.buffers["task sign sums"].bytes == 2 * 4 * parameters * 4
    # The tied head is the largest layer: 151936 x 896 over 8 x 512 completion positions -> direct.
    head = 151936 * 896
    assert plan.buffers["per-unit work"].bytes == 2 * head * 4 + 8 * 512 * (896 + 151936) * 4
    assert "lm_head: direct" in plan.buffers["per-unit work"].formula
    assert plan.buffers["task gradient (exact pass)"].bytes == head * 4


def test_qwen2_7b_on_one_141gb_device_needs_host_sums(qwen7):
    rollout = RolloutShape(4, 64, 8, 256, 1024)
    plan = qwen7.plan(rollout, PlanSettings(dtype_bytes=2, device_memory=141 * 10**9, host_memory=512 * GiB))
    assert plan.fits and plan.sums_location == "host" and plan.passes == 2
    sums = plan.buffers["task sign sums"]
    assert sums.where == "host" and sums.bytes == 2 * 4 * plan.selected_parameters * 4 > 141 * 10**9
    assert plan.buffers["host-sum staging"].where == "device"
    assert plan.micro_batch_prompts == 1 and plan.micro_batches == 256


def _settings_for(flags: str, settings: PlanSettings, planned: Planned):
    """The settings and selection an advice option's flags stand for."""
    words, selected, changes = flags.split(), planned.everything, {}
    for index, word in enumerate(words):
        if word == "--devices":
            changes["devices"] = int(words[index + 1])
        elif word == "--checkpoint-activations":
            changes["checkpoint_activations"] = True
        elif word == "--sums":
            changes["sums"] = words[index + 1]
        elif word == "--params":
            selected = planned.subsets[words[index + 1]]
    return replace(settings, **changes), selected


def test_qwen2_7b_without_host_memory_advice_is_truthful(qwen7):
    rollout = RolloutShape(4, 64, 8, 256, 1024)
    settings = PlanSettings(dtype_bytes=2, device_memory=141 * 10**9, host_memory=128 * GiB)
    plan = qwen7.plan(rollout, settings)
    assert not plan.fits and plan.advice is not None
    advice = plan.advice
    assert advice.needs_device_memory > settings.device_memory
    assert advice.needs_host_memory > settings.host_memory  # why host sums are no way out here
    by_flags = {o.flags: o for o in advice.options}
    assert not by_flags["--sums host"].fits
    assert any(f.startswith("--devices") and o.fits for f, o in by_flags.items())
    assert any(f.startswith("--params") and o.fits for f, o in by_flags.items())
    assert [o.fits for o in advice.options] == sorted((o.fits for o in advice.options), reverse=True)
    for option in advice.options:  # each option, planned again from its flags, says the same
        again = qwen7.plan(rollout, *_settings_for(option.flags, settings, qwen7))
        assert (again.fits, again.peak_bytes, again.sums_location) == (
            option.fits, option.peak_bytes, option.sums_location), option.flags
    fewest = min(int(f.split()[1]) for f in by_flags if f.startswith("--devices") and "--check" not in f)
    fewer = qwen7.plan(rollout, replace(settings, devices=fewest - 1))
    assert not fewer.fits  # the fewest devices really is the fewest


# ----------------------------------------------------------------------------- formulas by hand


def test_every_buffer_against_a_hand_computation():
    planned = Planned(small_llama_config())
    rollout = RolloutShape(tasks=2, prompts_per_task=3, group_size=2, prompt_len=5, completion_len=7)
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64  # q k v o, gate up down, two norms
    total = 100 * 64 + 2 * per_layer + 64 + 64 * 100  # embedding, layers, final norm, untied head
    assert planned.shape.total_parameters == total == 86848
    # per token, b = 2, S = 12: layer = 8h + 8bh + 4bi + 4 heads + 8 + S b
    layer = 8 * 64 + 8 * 2 * 64 + 4 * 2 * 128 + 4 * 4 + 8 + 12 * 2
    assert layer_activation_bytes_per_token(planned.shape.architecture, 2, 12) == layer == 2608
    per_token = 2 * layer + 8 + (4 * 64 + 4 + 2 * 2 * 64) + 2 * (2 * 64 + 3 * 128)
    assert activation_bytes_per_token(planned.shape.architecture, 2, 12) == per_token == 6764
    logits = 100 * (2 + 12)
    per_prompt = 24 * per_token + 14 * logits  # T_p = 2 x 12 tokens, K x C = 14 logit positions
    # gate/up/down at T_p = 24: 24 x 192 < 64 x 128, so ghost: 2 T^2 x 4 + T (d_in + d_out) x 4;
    # k_proj and v_proj (64 -> 32): 24 x 96 >= 64 x 32, so direct: 2 x 32 x 64 x 4 + T (64 + 32) x 4
    ghost_mlp = 2 * 24 * 24 * 4 + 24 * (64 + 128) * 4
    direct_kv = 2 * 32 * 64 * 4 + 24 * (64 + 32) * 4
    work = max(ghost_mlp, direct_kv)
    assert (ghost_mlp, direct_kv) == (23040, 25600)
    fixed = total * 2 + 2 * 2 * total * 4 + work + 8192 * 4
    settings = PlanSettings(dtype_bytes=2, device_memory=math.ceil((fixed + 2.5 * per_prompt) / 0.9),
                            host_memory=GiB)
    plan = planned.plan(rollout, settings)
    buffers = {name: b.bytes for name, b in plan.buffers.items()}
    assert buffers == {
        "model weights": total * 2,
        "task sign sums": 2 * 2 * total * 4,
        "per-unit work": work,
        "task gradient (exact pass)": 8192 * 4,
        "per-unit scalars": 12 * 7 * 2 * 8,  # 12 units x 7 groups (embeddings, 2 x attention/mlp, norms, head)
        "activations": 2 * 24 * per_token,
        "head logits": 2 * 14 * logits,
    }
    assert plan.prompt_bytes == per_prompt
    assert plan.buffers["per-unit work"].formula.startswith("model.layers.0.self_attn.k_proj: direct")
    assert (plan.micro_batch_prompts, plan.micro_batches, plan.micro_batch_tokens) == (2, 3, 48)
    assert plan.peak_bytes == fixed + 2 * per_prompt and plan.fits
    sketched = planned.plan(rollout, replace(settings, intervals="sketch"))
    assert sketched.buffers["unit sketches"].bytes == 12 * 7 * 1024 * 8
    assert sketched.passes == 1 and "task gradient (exact pass)" not in sketched.buffers
    small = replace(settings, device_memory=math.ceil((fixed + 0.5 * per_prompt) / 0.9))
    too_small = planned.plan(rollout, replace(small, sums="device"))
    assert not too_small.fits and too_small.advice.needs_device_memory == math.ceil((fixed + per_prompt) / 0.9)
    moved = planned.plan(rollout, small)  # --sums auto: the device cannot hold them, the host can
    on_device_then = fixed - 2 * 2 * total * 4 + 2 * 8192 * 4  # the sums leave, their staging comes
    assert moved.fits and moved.sums_location == "host"
    assert moved.micro_batch_prompts == min(6, (moved.usable_device_memory - on_device_then) // per_prompt)
    assert moved.buffers["host-sum staging"].bytes == 2 * 8192 * 4
    assert moved.host_peak_bytes == 2 * 2 * total * 4 + 12 * 7 * 2 * 8


def test_the_cheaper_rule_per_linear_layer():
    assert linear_work_bytes(64, 128, 24).rule == "ghost"  # 24 x 192 < 8192
    direct = linear_work_bytes(64, 128, 64)  # 64 x 192 >= 8192
    assert direct.rule == "direct" and direct.bytes == 2 * 64 * 128 * 4 + 64 * 192 * 4


def test_checkpointing_devices_and_the_cpu_cap():
    planned = Planned(small_llama_config(max_position_embeddings=256))
    arch = planned.shape.architecture
    full = activation_bytes_per_token(arch, 4, 12)
    checkpointed = activation_bytes_per_token(arch, 4, 12, checkpoint_activations=True)
    layer = layer_activation_bytes_per_token(arch, 4, 12)
    assert full - checkpointed == 2 * layer - (2 * 4 * 64 + layer)
    rollout = RolloutShape(2, 64, 8, 50, 75)  # T_p = 1000 tokens
    settings = PlanSettings(dtype_bytes=4, device_memory=64 * GiB, host_memory=64 * GiB, device_kind="cpu")
    on_cpu = planned.plan(rollout, settings)
    assert on_cpu.micro_batch_prompts == 4 and on_cpu.micro_batch_tokens == 4000  # at most 4096
    assert on_cpu.micro_batches == 32
    one = planned.plan(rollout, replace(settings, device_kind="cuda"))
    two = planned.plan(rollout, replace(settings, device_kind="cuda", devices=2, shard="params"))
    assert two.shard == "params"
    assert two.buffers["model weights"].bytes == math.ceil(one.buffers["model weights"].bytes / 2)
    assert two.buffers["task sign sums"].bytes == math.ceil(one.buffers["task sign sums"].bytes / 2)
    assert one.micro_batch_prompts == 128 and two.micro_batch_prompts == 64  # the prompts each device gets
    assert two.micro_batches == one.micro_batches == 1
    # auto: replicated when that fits (the least exchanged); sums only: weights whole, sums halved
    replicated = planned.plan(rollout, replace(settings, device_kind="cuda", devices=2))
    assert replicated.shard == "none" and replicated.fits
    assert replicated.buffers["task sign sums"].bytes == one.buffers["task sign sums"].bytes
    assert "gathered weights (FSDP2)" not in replicated.buffers
    sums_only = planned.plan(rollout, replace(settings, device_kind="cuda", devices=2, shard="sums"))
    assert sums_only.buffers["model weights"].bytes == one.buffers["model weights"].bytes
    assert sums_only.buffers["task sign sums"].bytes == two.buffers["task sign sums"].bytes
    fixed = sum(b.bytes for n, b in replicated.buffers.items()
                if b.where == "device" and n not in ("activations", "head logits"))
    tight = planned.plan(rollout, replace(settings, device_kind="cuda", devices=2, device_memory=fixed))
    assert tight.shard == "params"  # replicated does not fit: auto shards
    hosted = planned.plan(rollout, replace(settings, device_kind="cuda", devices=2, sums="host", intervals="sketch",
                                           shard="params"))
    shards = {name: hosted.buffers[name].bytes for name in ("task sign sums", "unit sketches", "per-unit scalars")}
    assert shards["unit sketches"] == 128 * 7 * 1024 * 8  # each device sketches its 128 of the 256 units
    assert hosted.host_peak_bytes == 2 * shards["task sign sums"] + 2 * shards["unit sketches"] + shards["per-unit scalars"]
    assert planned.plan(rollout, replace(settings, sums="host")).sums_location == "device"  # on CPU, host is the device


# ----------------------------------------------------------------------------- against autograd


def _saved_bytes(model: torch.nn.Module, input_ids, attention_mask, completion_len: int) -> tuple[int, int]:
    """(bytes autograd saves in decoder layer 1, in the whole forward), storages counted once,
    the weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, int | None]] = {}
    where: list[int | None] = [None]
    keep = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), where[0]))
            keep.append(storage)
        return tensor

    layer = model.model.layers[1]
    handles = [layer.register_forward_pre_hook(lambda *_: where.__setitem__(0, 1)),
               layer.register_forward_hook(lambda *_: where.__setitem__(0, None))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=completion_len).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        loss = log_probs.gather(-1, input_ids[:, -completion_len:, None]).sum()
    loss.backward()
    for handle in handles:
        handle.remove()
    in_layer = sum(size for size, owner in storages.values() if owner == 1)
    return in_layer, sum(size for size, _ in storages.values())


@pytest.mark.parametrize("make, dtype", [(Qwen2Config, torch.bfloat16), (LlamaConfig, torch.float32)])
def test_activation_formula_against_what_autograd_saves(make, dtype):
    config = make(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
    sequences, prompt_len, completion_len = 4, 24, 40
    input_ids = torch.randint(3, 256, (sequences, prompt_len + completion_len))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0  # left padding, as the engine pads prompts
    in_layer, whole = _saved_bytes(model, input_ids, attention_mask, completion_len)
    arch, b, tokens = Architecture.of(config), dtype.itemsize, input_ids.numel()
    layer_estimate = tokens * layer_activation_bytes_per_token(arch, b, prompt_len + completion_len)
    assert in_layer <= layer_estimate <= 1.05 * in_layer, (layer_estimate, in_layer)
    estimate = (tokens * activation_bytes_per_token(arch, b, prompt_len + completion_len)
                + sequences * completion_len * logits_bytes_per_completion_token(arch, b))
    assert whole <= estimate <= 1.5 * whole, (estimate, whole)


def test_plan_for_model_uses_the_real_model_and_lengths(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    names = select_parameters(model, ["mlp"])
    rollout = RolloutShape.from_lengths(["add", "add", "echo"], [7, 9, 5], [[3, 12], [4, 4], [6, 1]])
    assert (rollout.tasks, rollout.prompts_per_task, rollout.group_size) == (2, 2, 2)
    assert (rollout.prompt_len, rollout.completion_len, rollout.prompt_tokens) == (9, 12, 42)
    plan = plan_for_model(model, names, rollout, device_memory=GiB, host_memory=GiB, intervals="none")
    assert plan.fits and plan.passes == 1 and plan.sums_location == "device"
    assert plan.selected_parameters == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert plan.buffers["model weights"].bytes == 4 * sum(p.numel() for p in model.parameters())
    assert plan.micro_batch_prompts == 4 // 2 * 2 and plan.micro_batches == 1  # 4 prompts, all in one


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    path = tmp_path_factory.mktemp("config-only")
    small_llama_config(max_position_embeddings=2048).save_pretrained(path)
    assert [p.name for p in path.iterdir()] == ["config.json"]
    return path


def plan_cli(model, *extra):
    base = ["plan", str(model), "--tasks", "4", "--prompts-per-task", "16", "-k", "8", "--prompt-len", "64",
            "--completion-len", "128", "--host-memory", "8"]
    return runner.invoke(app, base + [str(e) for e in extra])


def test_cli_fits_from_a_config_only_folder(config_only):
    result = plan_cli(config_only, "--device-memory", "2")
    assert result.exit_code == 0, result.output
    for text in ("task sign sums", "activations", "head logits", "per-unit work", "micro-batch", "passes: 2",
                 "fits"):
        assert text in result.output


def test_cli_json_matches_its_schema_and_devices_shard(config_only):
    one = plan_cli(config_only, "--device-memory", "2", "--json")
    two = plan_cli(config_only, "--device-memory", "2", "--json", "--devices", "2", "--shard", "params")
    assert one.exit_code == two.exit_code == 0, one.output + two.output
    first, second = json.loads(one.output), json.loads(two.output)
    for document in (first, second):
        schema.validate(document, "plan")
        assert {"fits", "peak_bytes", "passes", "buffers"} <= set(document)
    for name in ("model weights", "task sign sums"):
        assert second["buffers"][name]["bytes"] == math.ceil(first["buffers"][name]["bytes"] / 2)
    assert "gathered weights (FSDP2)" in second["buffers"] and second["shard"] == "params"
    assert first["shard"] == "none"


def test_checkpointing_on_several_devices_is_planned_replicated(config_only):
    """Sharded passes do not follow the recomputation's order: --checkpoint-activations with
    --shard sums|params is refused, auto plans it replicated, and advice never combines them."""
    refused = plan_cli(config_only, "--device-memory", "2", "--devices", "2", "--shard", "params",
                       "--checkpoint-activations")
    assert refused.exit_code == 2 and "--shard none" in refused.output and "Traceback" not in refused.output
    auto = plan_cli(config_only, "--device-memory", "2", "--devices", "2", "--checkpoint-activations", "--json")
    assert auto.exit_code == 0 and json.loads(auto.output)["shard"] == "none"
    advised = plan_cli(config_only, "--device-memory", "0.09", "--completion-len", "1024", "--devices", "2",
                       "--shard", "params", "--json")
    assert advised.exit_code == 1, advised.output
    assert any("--checkpoint-activations" in o["flags"] for o in json.loads(advised.output)["advice"]["options"])


def test_cli_exit_1_says_what_would_fit(config_only):
    result = plan_cli(config_only, "--device-memory", "0.05", "--completion-len", "1024", "--json")
    assert result.exit_code == 1, result.output
    document = json.loads(result.output)
    schema.validate(document, "plan")
    assert not document["fits"] and document["advice"]["options"]
    table = plan_cli(config_only, "--device-memory", "0.09", "--completion-len", "1024")
    assert table.exit_code == 1 and "does not fit" in table.output
    assert "What would make it fit" in table.output and "--checkpoint-a" in table.output
    options = json.loads(plan_cli(config_only, "--device-memory", "0.09", "--completion-len", "1024",
                                  "--json").output)["advice"]["options"]
    assert {"flags": "--checkpoint-activations", "fits": True}.items() <= options[0].items()
    fixed = plan_cli(config_only, "--device-memory", "0.09", "--completion-len", "1024", "--checkpoint-activations")
    assert fixed.exit_code == 0, fixed.output  # the advice was right


@pytest.mark.parametrize("extra, fragment", [
    (["--dtype", "int8"], "--dtype"),
    (["--intervals", "maybe"], "--intervals"),
    (["--sums", "disk"], "--sums"),
    (["--prompt-len", "2000"], "max_position_embeddings"),
    (["--params", "nothing.*"], "matches no trainable parameter"),
    (["--device-memory", "-1"], "--device-memory"),
    (["--group-size", "0"], "--group-size"),
])
def test_cli_bad_input_exits_2_with_one_line(config_only, extra, fragment):
    result = plan_cli(config_only, "--device-memory", "2", *extra)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_cli_model_that_is_not_there(tmp_path):
    result = plan_cli(tmp_path / "nowhere", "--device-memory", "2")
    assert result.exit_code == 2 and "no such directory" in result.output
    (tmp_path / "config.json").write_text('{"model_type": "not-a-model"}')
    result = plan_cli(tmp_path, "--device-memory", "2")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
