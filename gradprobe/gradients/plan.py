"""The memory planner of the streaming gradient engine: every buffer, the micro-batch and the passes.

Before any model work, `plan_scan` estimates, buffer by buffer, what one gradient scan holds on
each device and in host memory, picks how many whole prompts go into one micro-batch, how many
passes run (`--intervals`) and where the task sign sums live (`--sums`), and says whether it fits.
When it does not, `ScanPlan.advice` gives what it needs and the options that would make it fit,
each planned the same way. `gradprobe plan` prints it from a config alone (the model built on the
meta device, no weights read); the engine calls `plan_for_model` with the loaded model and the
real rollout lengths.

The engine planned for: one ordinary forward and backward per micro-batch of whole prompts (each
prompt is K completions, split into a positive- and a negative-advantage unit), the selected
parameters frozen; module hooks turn each layer's input and output gradient into per-unit
quantities and free them layer by layer. Memory is flat in prompts per task apart from O(units)
scalars (and, with `--intervals sketch`, the per-unit sketches).

Sizes are bytes; b is the byte width of the model's dtype. Every formula is in the docstring of
the function that computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, Sequence

import torch

from gradprobe.errors import UserInputError
from gradprobe.gradients.params import block_index, module_group, select_parameters

SCHEMA_VERSION = "1.0"
SAFETY_MARGIN = 0.10  # of each memory kept free (allocator fragmentation, CUDA context, spikes)
CPU_MAX_TOKENS = 4096  # padded tokens per micro-batch on CPU: larger ones were measured slower
DEFAULT_SKETCH_DIM = 1024
FLOAT32 = 4
FLOAT64 = 8
TOKEN_ID = 8  # int64
MAX_DEVICES_ADVISED = 64
SUBSET_PRESETS = ("mlp", "attention", "last-block")

# Buffers each device holds its own share of: on the host, all devices' shares add up.
PER_DEVICE = frozenset({"task sign sums", "unit sketches"})

Where = Literal["device", "host"]
INTERVALS = ("exact", "sketch", "none")
SUMS = ("auto", "device", "host")
SHARD = ("auto", "none", "sums", "params")
"""--shard with several devices: none (weights and sums whole on each), sums (sums 1/N each),
params (FSDP2: weights and sums 1/N each, one layer gathered at a time), auto (none when that
fits, else params: replicated ranks exchange least)."""
CHECKPOINT_REPLICATED = ("--checkpoint-activations runs with --shard none on several devices (the sharded "
                         "exchanges do not yet follow the recomputation's order)")
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "float64": 8}


def physical_host_memory() -> int:
    """This machine's physical memory in bytes (the default --host-memory)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a model dtype given by name (bfloat16, float32, ...) or torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if dtype not in DTYPE_BYTES:
        raise UserInputError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    return DTYPE_BYTES[dtype]


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Architecture:
    """The decoder sizes the activation formula needs, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    max_positions: int | None

    @classmethod
    def of(cls, config: Any) -> "Architecture":
        """From a PretrainedConfig; a missing intermediate_size means 4 x hidden (GPT-2 style).

    The activation formulas are derived for Llama/Qwen2-style decoders; for other decoders
    (LayerNorm, GELU MLP) they are an estimate of the same order, not a derivation."""
        missing = [key for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if getattr(config, key, None) is None]
        if missing:
            raise UserInputError(
                f"the model config has no {', '.join(missing)}; the planner knows decoder-only "
                "transformers (Llama, Qwen2, Mistral and the like)")
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        return cls(
            hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            vocab=int(config.vocab_size),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=getattr(config, "max_position_embeddings", None),
        )


@dataclass(frozen=True)
class ParameterUse:
    """One module's use of a parameter: the per-unit rule depends on the module's kind and on
    the tokens it sees (the head sees completion positions only, by logits_to_keep)."""

    module: str
    kind: Literal["linear", "embedding", "other"]
    d_in: int
    d_out: int
    completions_only: bool


@dataclass(frozen=True)
class ParameterShape:
    name: str
    numel: int
    uses: tuple[ParameterUse, ...]


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model: its sizes and, per unique parameter, who uses it."""

    architecture: Architecture
    parameters: dict[str, ParameterShape]

    @property
    def total_parameters(self) -> int:
        return sum(p.numel for p in self.parameters.values())

    def root_parameters(self) -> int:
        """Parameters outside the decoder blocks (embeddings, final norm, head)."""
        return sum(p.numel for n, p in self.parameters.items() if block_index(n) is None)

    def largest_block_parameters(self) -> int:
        """Parameters of the largest decoder block."""
        blocks: dict[int, int] = {}
        for name, parameter in self.parameters.items():
            block = block_index(name)
            if block is not None:
                blocks[block] = blocks.get(block, 0) + parameter.numel
        return max(blocks.values(), default=0)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        """From a model on any device, the meta device included (only shapes are read)."""
        architecture = Architecture.of(model.config)
        names = {id(p): n for n, p in model.named_parameters()}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        uses: dict[str, list[ParameterUse]] = {n: [] for n in names.values()}
        for module_name, module in model.named_modules():
            for _, parameter in module.named_parameters(recurse=False):
                if id(parameter) in names:
                    uses[names[id(parameter)]].append(_use(module_name, module, parameter, module is head))
        parameters = {n: ParameterShape(n, p.numel(), tuple(uses[n])) for n, p in model.named_parameters()}
        return cls(architecture, parameters)


def _use(module_name: str, module: torch.nn.Module, parameter: torch.nn.Parameter,
         is_head: bool) -> ParameterUse:
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear) and parameter is weight:
        return ParameterUse(module_name, "linear", module.in_features, module.out_features, is_head)
    if isinstance(module, torch.nn.Embedding) and parameter is weight:
        return ParameterUse(module_name, "embedding", module.num_embeddings, module.embedding_dim, False)
    return ParameterUse(module_name, "other", 1, parameter.numel(), is_head)


def meta_model(config: Any) -> torch.nn.Module:
    """The causal LM of `config` built on the meta device: shapes, no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise UserInputError(f"cannot build this model from its config ({str(exc).splitlines()[0]})") from None


# ----------------------------------------------------------------------------- rollout shapes


@dataclass(frozen=True)
class RolloutShape:
    """The rollouts of a scan: tasks x prompts per task x K completions, padded lengths."""

    tasks: int
    prompts_per_task: int
    group_size: int
    prompt_len: int
    completion_len: int

    def __post_init__(self) -> None:
        for key in ("tasks", "prompts_per_task", "group_size", "prompt_len", "completion_len"):
            if getattr(self, key) < 1:
                raise UserInputError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")

    @property
    def prompts(self) -> int:
        return self.tasks * self.prompts_per_task

    @property
    def units(self) -> int:
        """Two units per prompt: its positive- and its negative-advantage completions."""
        return 2 * self.prompts

    @property
    def sequence_len(self) -> int:
        return self.prompt_len + self.completion_len

    @property
    def prompt_tokens(self) -> int:
        """T_p = K x (prompt_len + completion_len): padded tokens of one prompt's K sequences."""
        return self.group_size * self.sequence_len

    @property
    def completion_tokens(self) -> int:
        """K x completion_len: the positions whose logits are kept."""
        return self.group_size * self.completion_len

    @classmethod
    def from_lengths(cls, tasks: Sequence[str], prompt_lens: Sequence[int],
                     completion_lens: Sequence[Sequence[int]]) -> "RolloutShape":
        """From real rollouts, one entry per prompt (its task, prompt tokens, the K completions'
        tokens). Upper bounds: the largest task's prompt count and the longest prompt and
        completion, since a micro-batch pads to its longest sequence."""
        if not (len(tasks) == len(prompt_lens) == len(completion_lens)) or not tasks:
            raise ValueError("tasks, prompt_lens and completion_lens need one entry per prompt")
        counts: dict[str, int] = {}
        for task in tasks:
            counts[task] = counts.get(task, 0) + 1
        return cls(tasks=len(counts), prompts_per_task=max(counts.values()),
                   group_size=max(len(c) for c in completion_lens),
                   prompt_len=max(prompt_lens), completion_len=max(max(c) for c in completion_lens))


# ----------------------------------------------------------------------------- formulas


def layer_activation_bytes_per_token(arch: Architecture, b: int, sequence_len: int) -> int:
    """What autograd saves per token in one Llama/Qwen2 decoder layer with sdpa attention:

        8h + 8bh + 4bi + 4 n_heads + 8 + S b

    - two RMSNorms, each: its input in float32 (4h), 1/rms (4), the normalized input in the model
      dtype (bh) and its output, the next projections' input (bh): 2 x (4h + 4 + 2bh);
    - attention: q, k and v after rotary and repeat_kv to all heads (a padding mask makes
      transformers repeat k and v), the attention output, which is o_proj's input (4bh), and the
      float32 log-sum-exp per head (4 n_heads);
    - the padding mask as an additive bias in the model dtype, one row of S = prompt_len +
      completion_len per token (S b);
    - MLP: gate_proj's output, SiLU of it, up_proj's output and their product, down_proj's
      input (4bi).
    Rotary cos and sin are per position, shared by the layers, and left out. With every weight
    trainable this is what autograd saves; with frozen weights the engine's hooks keep each
    linear's input instead, so it is an upper bound whatever --params selects.
    """
    h, i = arch.hidden, arch.intermediate
    return 8 * h + 8 * b * h + 4 * b * i + 4 * arch.heads + 8 + sequence_len * b


def activation_bytes_per_token(arch: Architecture, b: int, sequence_len: int,
                               checkpoint_activations: bool = False) -> int:
    """Bytes per token of one micro-batch, all decoder layers and what surrounds them:

        L x layer + 8 + (4h + 4 + 2bh) + b (2h + 3i)

    layer = `layer_activation_bytes_per_token`; 8 = the token id (int64); 4h + 4 + 2bh = the
    final norm, whose output is the head's input; b (2h + 3i) = the gradients in flight in
    backward (the residual stream's, and the MLP's three i-wide ones of the layer being
    differentiated). With --checkpoint-activations only each layer's input is kept (L x bh) and one
    layer is recomputed at a time (+ layer).
    """
    h, i = arch.hidden, arch.intermediate
    layer = layer_activation_bytes_per_token(arch, b, sequence_len)
    layers = arch.layers * b * h + layer if checkpoint_activations else arch.layers * layer
    return layers + TOKEN_ID + (4 * h + 4 + 2 * b * h) + b * (2 * h + 3 * i)


def logits_bytes_per_completion_token(arch: Architecture, b: int) -> int:
    """V (b + 12) per completion position (logits_to_keep keeps only these): the logits in the
    model dtype, their float32 log-softmax (saved for backward) and, in its backward, the float32
    incoming and outgoing gradients."""
    return arch.vocab * (b + 3 * FLOAT32)


def activation_bytes_per_prompt(arch: Architecture, b: int, rollout: RolloutShape,
                                checkpoint_activations: bool = False) -> tuple[int, int]:
    """(activations, head logits) of one prompt: T_p x per-token bytes, K C x per-logit bytes."""
    per_token = activation_bytes_per_token(arch, b, rollout.sequence_len, checkpoint_activations)
    return (rollout.prompt_tokens * per_token,
            rollout.completion_tokens * logits_bytes_per_completion_token(arch, b))


@dataclass(frozen=True)
class WorkBuffer:
    module: str
    rule: Literal["direct", "ghost"]
    bytes: int


def linear_work_bytes(d_in: int, d_out: int, tokens: int) -> WorkBuffer:
    """Per-unit work of one linear layer for the two units of one prompt in flight, by the rule
    cheaper in FLOPs: ghost when T (d_in + d_out) < d_in d_out, else direct.

    direct: the two per-unit gradients, 2 x d_out x d_in x 4; ghost: the token Grams of the inputs
    and of the output gradients, 2 x T^2 x 4. Either way + the prompt's inputs and output
    gradients in float32, T (d_in + d_out) x 4. T is the tokens the layer sees in one prompt.
    """
    operands = tokens * (d_in + d_out) * FLOAT32
    if tokens * (d_in + d_out) < d_in * d_out:
        return WorkBuffer("", "ghost", 2 * tokens * tokens * FLOAT32 + operands)
    return WorkBuffer("", "direct", 2 * d_out * d_in * FLOAT32 + operands)


def use_work_bytes(use: ParameterUse, numel: int, rollout: RolloutShape) -> WorkBuffer:
    """Per-unit work of one parameter use: linear by `linear_work_bytes`; an embedding by rows
    grouped by token id, 2 x min(T_p, V) x d x 4 (direct; its ghost norm is never cheaper); any
    other (norms, biases) its two per-unit gradients, 2 x numel x 4."""
    tokens = rollout.completion_tokens if use.completions_only else rollout.prompt_tokens
    if use.kind == "linear":
        found = linear_work_bytes(use.d_in, use.d_out, tokens)
    elif use.kind == "embedding":
        found = WorkBuffer("", "direct", 2 * min(tokens, use.d_in) * use.d_out * FLOAT32)
    else:
        found = WorkBuffer("", "direct", 2 * numel * FLOAT32)
    return replace(found, module=use.module)


def largest_work_buffer(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape) -> WorkBuffer:
    """The largest per-unit work buffer over the selected parameters' uses (one layer at a time is
    in flight)."""
    buffers = [use_work_bytes(use, shape.parameters[n].numel, rollout)
               for n in selected for use in shape.parameters[n].uses]
    return max(buffers, key=lambda w: w.bytes, default=WorkBuffer("", "direct", 0))


def sums_bytes(tasks: int, selected_parameters: int) -> int:
    """Task sign sums S_t+ and S_t-: 2 x T x P_selected x 4 (float32 whatever the model dtype)."""
    return 2 * tasks * selected_parameters * FLOAT32


def sketch_bytes(units: int, groups: int, sketch_dim: int = DEFAULT_SKETCH_DIM) -> int:
    """Per-unit sketches of --intervals sketch: units x groups x k x 8."""
    return units * groups * sketch_dim * FLOAT64


def unit_scalar_bytes(units: int, groups: int) -> int:
    """Per-unit squared norms and row sums per module group, float64: units x groups x 2 x 8."""
    return units * groups * 2 * FLOAT64


def passes_for(intervals: str) -> int:
    """exact: a second pass of the same shape for the row sums r_p; sketch and none: one pass."""
    return 2 if intervals == "exact" else 1


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanSettings:
    """How the scan would run: everything the planner varies when it looks for what fits."""

    dtype_bytes: int
    device_memory: int
    host_memory: int
    devices: int = 1
    intervals: str = "exact"
    checkpoint_activations: bool = False
    sums: str = "auto"
    device_kind: Literal["cuda", "cpu"] = "cuda"
    sketch_dim: int = DEFAULT_SKETCH_DIM
    shard: str = "auto"

    def __post_init__(self) -> None:
        if self.intervals not in INTERVALS:
            raise UserInputError(f"--intervals {self.intervals!r}: choose {', '.join(INTERVALS)}")
        if self.sums not in SUMS:
            raise UserInputError(f"--sums {self.sums!r}: choose {', '.join(SUMS)}")
        if self.devices < 1:
            raise UserInputError(f"--devices must be at least 1, got {self.devices}")
        if self.shard not in SHARD:
            raise UserInputError(f"--shard {self.shard!r}: choose {', '.join(SHARD)}")
        if self.checkpoint_activations and self.devices > 1 and self.shard in ("sums", "params"):
            raise UserInputError(CHECKPOINT_REPLICATED)

    @property
    def sharded_weights(self) -> bool:
        return self.devices > 1 and self.shard == "params"

    @property
    def sharded_sums(self) -> bool:
        return self.devices > 1 and self.shard in ("sums", "params")
        if self.device_memory <= 0 or self.host_memory <= 0:
            raise UserInputError("--device-memory and --host-memory must be positive")


@dataclass(frozen=True)
class Buffer:
    bytes: int
    where: Where
    formula: str


@dataclass(frozen=True)
class PlanOption:
    """One change of the command that was planned in full: its flags, and what it gives."""

    flags: str
    fits: bool
    peak_bytes: int
    host_peak_bytes: int
    sums_location: Where
    micro_batch_prompts: int


@dataclass(frozen=True)
class Advice:
    """What a plan that does not fit needs, and the options, fitting ones first.

    needs_device_memory: per device, for the plan as asked (its fixed buffers and one prompt);
    needs_host_memory: what host-resident sums would need of the host (None on CPU)."""

    needs_device_memory: int
    needs_host_memory: int | None
    options: list[PlanOption]


@dataclass(frozen=True)
class ScanPlan:
    """The planned scan. Sizes in bytes, per device; `peak_bytes` is the device's peak."""

    fits: bool
    peak_bytes: int
    passes: int
    buffers: dict[str, Buffer]
    micro_batch_prompts: int
    micro_batch_tokens: int
    micro_batches: int
    sums_location: Where
    device_memory: int
    host_memory: int
    usable_device_memory: int
    host_peak_bytes: int
    devices: int
    intervals: str
    checkpoint_activations: bool
    selected_parameters: int
    total_parameters: int
    prompt_bytes: int
    shard: str = "none"
    """none, sums or params (auto resolved); none with one device."""
    advice: Advice | None = None
    rollout: RolloutShape | None = field(default=None, compare=False)

    def to_document(self, model: str | None = None) -> dict[str, Any]:
        """The `gradprobe plan --json` object (schema gradprobe/schema/plan.schema.json)."""
        rollout = self.rollout
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "plan",
            "model": model,
            "fits": self.fits,
            "peak_bytes": self.peak_bytes,
            "device_memory_bytes": self.device_memory,
            "usable_device_memory_bytes": self.usable_device_memory,
            "host_memory_bytes": self.host_memory,
            "host_peak_bytes": self.host_peak_bytes,
            "devices": self.devices,
            "shard": self.shard,
            "passes": self.passes,
            "intervals": self.intervals,
            "checkpoint_activations": self.checkpoint_activations,
            "sums_location": self.sums_location,
            "selected_parameters": self.selected_parameters,
            "total_parameters": self.total_parameters,
            "rollouts": None if rollout is None else {
                "tasks": rollout.tasks, "prompts_per_task": rollout.prompts_per_task,
                "group_size": rollout.group_size, "prompt_len": rollout.prompt_len,
                "completion_len": rollout.completion_len},
            "micro_batch": {"prompts": self.micro_batch_prompts, "padded_tokens": self.micro_batch_tokens,
                            "per_pass": self.micro_batches, "bytes_per_prompt": self.prompt_bytes},
            "buffers": {name: {"bytes": b.bytes, "where": b.where, "formula": b.formula}
                        for name, b in self.buffers.items()},
            "advice": None if self.advice is None else {
                "needs_device_memory_bytes": self.advice.needs_device_memory,
                "needs_host_memory_bytes": self.advice.needs_host_memory,
                "options": [{"flags": o.flags, "fits": o.fits, "peak_bytes": o.peak_bytes,
                             "host_peak_bytes": o.host_peak_bytes, "sums_location": o.sums_location,
                             "micro_batch_prompts": o.micro_batch_prompts} for o in self.advice.options]},
        }


def _fixed_buffers(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape,
                   settings: PlanSettings, sums_where: Where) -> dict[str, Buffer]:
    """Every buffer but the micro-batch's activations, per device."""
    b, n = settings.dtype_bytes, settings.devices
    n_weights, n_sums = (n if settings.sharded_weights else 1), (n if settings.sharded_sums else 1)
    chosen = sum(shape.parameters[name].numel for name in selected)
    groups = len({module_group(name) for name in selected})
    work = largest_work_buffer(shape, selected, rollout)
    largest = max(shape.parameters[name].numel for name in selected)
    shard = f" / {n} devices" if n_weights > 1 else ""
    buffers = {"model weights": Buffer(math.ceil(shape.total_parameters * b / n_weights), "device",
                                       f"{shape.total_parameters:,} parameters x {b} B{shard}")}
    if n_weights > 1:
        gathered = (shape.root_parameters() + 2 * shape.largest_block_parameters()) * b
        buffers["gathered weights (FSDP2)"] = Buffer(
            gathered, "device", "unsharded: embeddings and head, plus the current and next block")
    shard = f" / {n} devices" if n_sums > 1 else ""
    buffers["task sign sums"] = Buffer(
        math.ceil(sums_bytes(rollout.tasks, chosen) / n_sums), sums_where,
        f"2 x {rollout.tasks} tasks x {chosen:,} parameters x 4 B{shard}")
    if n_sums > 1:  # one layer's contributions of a step, and (exact pass) its gathered targets
        buffers["sum exchange (reduce-scatter)"] = Buffer(
            2 * rollout.tasks * largest * FLOAT32, "device",
            f"largest selected layer's touched sums, up to 2 x {rollout.tasks} x {largest:,} x 4 B")
    if sums_where == "host":
        buffers["host-sum staging"] = Buffer(
            2 * largest * FLOAT32, "device", "one layer's sum, double-buffered for the copy to host")
    buffers["per-unit work"] = Buffer(work.bytes, "device", f"{work.module}: {work.rule} rule, 2 units in flight")
    if settings.intervals == "exact":
        buffers["task gradient (exact pass)"] = Buffer(largest * FLOAT32, "device",
                                                       f"largest selected layer, {largest:,} x 4 B")
    if settings.intervals == "sketch":
        units = math.ceil(rollout.units / n)
        buffers["unit sketches"] = Buffer(
            sketch_bytes(units, groups, settings.sketch_dim), sums_where,
            f"{units} units x {groups} groups x k={settings.sketch_dim} x 8 B")
    buffers["per-unit scalars"] = Buffer(unit_scalar_bytes(rollout.units, groups), "host",
                                         f"{rollout.units} units x {groups} groups x 2 x 8 B")
    return buffers


def _micro_batch_prompts(free: int, prompt_bytes: int, rollout: RolloutShape, settings: PlanSettings) -> int:
    """Whole prompts per micro-batch per device: as many as `free` holds, at most the prompts one
    device gets, and on CPU at most CPU_MAX_TOKENS padded tokens (one prompt at least)."""
    fitting = free // prompt_bytes if prompt_bytes > 0 else rollout.prompts
    per_device = math.ceil(rollout.prompts / settings.devices)
    count = min(fitting, per_device)
    if settings.device_kind == "cpu":
        count = min(count, max(1, CPU_MAX_TOKENS // rollout.prompt_tokens))
    return max(count, 0)


def prompts_phrase(count: int) -> str:
    """"1 prompt", "3 prompts"."""
    return f"{count} prompt" if count == 1 else f"{count} prompts"


def _plan_at(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape, settings: PlanSettings,
             sums_where: Where) -> ScanPlan:
    arch, b = shape.architecture, settings.dtype_bytes
    buffers = _fixed_buffers(shape, selected, rollout, settings, sums_where)
    activations, logits = activation_bytes_per_prompt(arch, b, rollout, settings.checkpoint_activations)
    prompt_bytes = activations + logits
    usable = int(settings.device_memory * (1 - SAFETY_MARGIN))
    fixed = sum(x.bytes for x in buffers.values() if x.where == "device")
    count = _micro_batch_prompts(usable - fixed, prompt_bytes, rollout, settings)
    shown = max(count, 1)
    mode = ", checkpointed" if settings.checkpoint_activations else ""
    per_token = activations // rollout.prompt_tokens
    buffers["activations"] = Buffer(
        shown * activations, "device",
        f"{prompts_phrase(shown)} x {rollout.prompt_tokens:,} tokens x {per_token:,} B (sdpa{mode})")
    buffers["head logits"] = Buffer(
        shown * logits, "device",
        f"{prompts_phrase(shown)} x {rollout.completion_tokens:,} positions x {arch.vocab:,} x (b + 12) B")
    peak = fixed + shown * prompt_bytes
    host_peak = sum(x.bytes * (settings.devices if name in PER_DEVICE else 1)
                    for name, x in buffers.items() if x.where == "host")
    host_fits = host_peak <= settings.host_memory * (1 - SAFETY_MARGIN)
    steps = math.ceil(rollout.prompts / (shown * settings.devices))
    return ScanPlan(
        fits=count >= 1 and host_fits, peak_bytes=peak, passes=passes_for(settings.intervals),
        buffers=buffers, micro_batch_prompts=shown, micro_batch_tokens=shown * rollout.prompt_tokens,
        micro_batches=steps, sums_location=sums_where, device_memory=settings.device_memory,
        host_memory=settings.host_memory, usable_device_memory=usable, host_peak_bytes=host_peak,
        devices=settings.devices, intervals=settings.intervals,
        checkpoint_activations=settings.checkpoint_activations,
        selected_parameters=sum(shape.parameters[n].numel for n in selected),
        total_parameters=shape.total_parameters, prompt_bytes=prompt_bytes, rollout=rollout,
        shard=settings.shard if settings.devices > 1 else "none")


def _plan_without_advice(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape,
                         settings: PlanSettings) -> ScanPlan:
    """`--shard auto` with several devices: replicated (none) when that fits or activations are
    checkpointed (`CHECKPOINT_REPLICATED`), else params."""
    if settings.shard == "auto" and settings.checkpoint_activations:
        return _plan_placed(shape, selected, rollout, replace(settings, shard="none"))
    if settings.shard == "auto":
        replicated = _plan_placed(shape, selected, rollout, replace(settings, shard="none"))
        if replicated.fits or settings.devices == 1:
            return replicated
        return _plan_placed(shape, selected, rollout, replace(settings, shard="params"))
    return _plan_placed(shape, selected, rollout, settings)


def _plan_placed(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape,
                 settings: PlanSettings) -> ScanPlan:
    """`--sums auto`: on the device when the scan fits so, else in host memory when that fits;
    failing both, where it comes closer (host when the host can hold them). On CPU the device is
    the host: sums stay put."""
    if settings.device_kind == "cpu":
        return _plan_at(shape, selected, rollout, settings, "device")
    if settings.sums != "auto":
        return _plan_at(shape, selected, rollout, settings, "host" if settings.sums == "host" else "device")
    on_device = _plan_at(shape, selected, rollout, settings, "device")
    if on_device.fits:
        return on_device
    on_host = _plan_at(shape, selected, rollout, settings, "host")
    host_holds = on_host.host_peak_bytes <= settings.host_memory * (1 - SAFETY_MARGIN)
    return on_host if on_host.fits or host_holds else on_device


def plan_scan(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape, settings: PlanSettings,
              subsets: Mapping[str, Sequence[str]] | None = None) -> ScanPlan:
    """The plan of a scan of `selected` parameters of `shape` over `rollout`, under `settings`.

    `shape` comes from `ModelShape.of(model)` (a loaded or a meta-device model), `selected` are
    parameter names as `select_parameters` returns them. Peak per device = its fixed buffers +
    micro_batch_prompts x (activations + head logits of one prompt), the micro-batch holding as
    many whole prompts as fit in (1 - 10%) of the device's memory after the fixed buffers. It fits
    when one prompt does and host memory holds what lives there. When it does not, `advice` plans
    the options: host-resident sums, --checkpoint-activations, both, the fewest --devices that
    fit, and each `subsets` entry (a --params preset -> its names) that selects fewer parameters;
    when none of these fits, each subset with checkpointing too.
    """
    if rollout.sequence_len > (shape.architecture.max_positions or rollout.sequence_len):
        raise UserInputError(
            f"--prompt-len + --completion-len = {rollout.sequence_len} exceeds the model's "
            f"max_position_embeddings {shape.architecture.max_positions}")
    if not selected:
        raise UserInputError("no parameter selected: give --params a preset or glob that matches")
    plan = _plan_without_advice(shape, selected, rollout, settings)
    if plan.fits:
        return plan
    return replace(plan, advice=_advise(shape, selected, rollout, settings, plan, subsets or {}))


def _with_margin(size: int) -> int:
    """The memory of which (1 - SAFETY_MARGIN) holds `size`."""
    return math.ceil(size / (1 - SAFETY_MARGIN))


def _device_need(plan: ScanPlan) -> int:
    """Device memory that would hold the fixed buffers and one prompt, with the margin."""
    fixed = sum(b.bytes for n, b in plan.buffers.items()
                if b.where == "device" and n not in ("activations", "head logits"))
    return _with_margin(fixed + plan.prompt_bytes)


def _option(flags: str, plan: ScanPlan) -> PlanOption:
    return PlanOption(flags, plan.fits, plan.peak_bytes, plan.host_peak_bytes, plan.sums_location,
                      plan.micro_batch_prompts)


def _advise(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape, settings: PlanSettings,
            plan: ScanPlan, subsets: Mapping[str, Sequence[str]]) -> Advice:
    def planned(flags: str, chosen: Sequence[str] = selected, **changes: Any) -> PlanOption:
        if changes.get("checkpoint_activations") and settings.devices > 1:
            changes["shard"] = "none"  # CHECKPOINT_REPLICATED
        return _option(flags, _plan_without_advice(shape, chosen, rollout, replace(settings, **changes)))

    options = []
    if plan.sums_location == "device" and settings.device_kind == "cuda":
        options.append(planned("--sums host", sums="host"))
    if not settings.checkpoint_activations:
        options.append(planned("--checkpoint-activations", checkpoint_activations=True))
        if settings.device_kind == "cuda" and plan.sums_location == "device":
            options.append(planned("--checkpoint-activations --sums host", checkpoint_activations=True, sums="host"))
    if settings.device_kind == "cuda":
        options.extend(_fewest_devices(shape, selected, rollout, settings))
    chosen = sum(shape.parameters[n].numel for n in selected)
    smaller = {preset: names for preset, names in subsets.items()
               if names and sum(shape.parameters[n].numel for n in names) < chosen}
    for preset, names in smaller.items():
        options.append(planned(f"--params {preset}", chosen=names))
    if not any(option.fits for option in options) and not settings.checkpoint_activations:
        for preset, names in smaller.items():
            options.append(planned(f"--params {preset} --checkpoint-activations", chosen=names,
                                   checkpoint_activations=True))
    host_need = None
    if settings.device_kind == "cuda":
        on_host = plan if plan.sums_location == "host" else _plan_at(shape, selected, rollout, settings, "host")
        host_need = _with_margin(on_host.host_peak_bytes)
    return Advice(_device_need(plan), host_need, sorted(options, key=lambda o: not o.fits))


def _fewest_devices(shape: ModelShape, selected: Sequence[str], rollout: RolloutShape,
                    settings: PlanSettings) -> list[PlanOption]:
    """The fewest devices (up to 64) that fit, as is and with --checkpoint-activations."""
    found = []
    for checkpoint in sorted({settings.checkpoint_activations, True}):
        for devices in range(settings.devices + 1, MAX_DEVICES_ADVISED + 1):
            shard = "none" if checkpoint else settings.shard  # CHECKPOINT_REPLICATED
            tried = _plan_without_advice(shape, selected, rollout, replace(
                settings, devices=devices, checkpoint_activations=checkpoint, shard=shard))
            if tried.fits:
                extra = " --checkpoint-activations" if checkpoint and not settings.checkpoint_activations else ""
                found.append(_option(f"--devices {devices}{extra}", tried))
                break
    return found


# ----------------------------------------------------------------------------- entry points


def subset_selections(model: torch.nn.Module) -> dict[str, list[str]]:
    """The parameters of each --params preset the advice may propose (mlp, attention, last-block)."""
    found = {}
    for preset in SUBSET_PRESETS:
        try:
            found[preset] = select_parameters(model, [preset])
        except UserInputError:
            continue
    return found


def plan_for_model(model: torch.nn.Module, param_names: Sequence[str], rollout: RolloutShape,
                   device_memory: int, host_memory: int | None = None, *, devices: int = 1, intervals: str = "exact",
                   checkpoint_activations: bool = False, sums: str = "auto",
                   sketch_dim: int = DEFAULT_SKETCH_DIM, shard: str = "auto") -> ScanPlan:
    """The plan of scanning `param_names` of a loaded (or meta) `model` over `rollout`.

    The dtype and the device kind are the model's (CPU caps micro-batches at 4096 padded tokens);
    build `rollout` from the real lengths with `RolloutShape.from_lengths`. Memory in bytes;
    `host_memory` defaults to this machine's. On CPU the sums stay in (host) memory.
    """
    first = next(model.parameters())
    settings = PlanSettings(
        dtype_bytes=first.element_size(), device_memory=device_memory,
        host_memory=physical_host_memory() if host_memory is None else host_memory,
        devices=devices, intervals=intervals, checkpoint_activations=checkpoint_activations, sums=sums,
        device_kind="cpu" if first.device.type == "cpu" else "cuda", sketch_dim=sketch_dim, shard=shard)
    return plan_scan(ModelShape.of(model), list(param_names), rollout, settings, subset_selections(model))


def plan_for_config(config: Any, params: Sequence[str], rollout: RolloutShape,
                    settings: PlanSettings) -> ScanPlan:
    """The plan from a transformers config alone: the model is built on the meta device and
    `params` (presets or globs, as --params) are selected on it."""
    model = meta_model(config)
    selected = select_parameters(model, list(params))
    return plan_scan(ModelShape.of(model), selected, rollout, settings, subset_selections(model))

