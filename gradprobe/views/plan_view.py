"""`gradprobe plan` on the console: each buffer, the micro-batch plan, the passes, the verdict."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradprobe.gradients.plan import SAFETY_MARGIN, ScanPlan, prompts_phrase

GIB = 1 << 30


def gib(size: int | float) -> str:
    """Bytes for a table cell: GiB (2 decimals below 10, 1 above), MiB or KiB when smaller."""
    if size < (1 << 20):
        return f"{size / 1024:.1f} KiB"
    if size < GIB:
        return f"{size / (1 << 20):.1f} MiB"
    value = size / GIB
    return f"{value:.2f} GiB" if value < 10 else f"{value:.1f} GiB"


def _buffer_table(plan: ScanPlan) -> Table:
    per = "per device" if plan.devices > 1 else "device"
    table = Table(title=f"Buffers ({per} unless host)", title_justify="left")
    table.add_column("buffer")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("lives on")
    table.add_column("how", overflow="fold")
    for name, buffer in plan.buffers.items():
        table.add_row(name, gib(buffer.bytes), buffer.where, buffer.formula)
    return table


def _summary_lines(plan: ScanPlan) -> list[str]:
    rollout = plan.rollout
    device = f" on each of {plan.devices} devices" if plan.devices > 1 else ""
    sharing = {"none": "weights and task sums whole on each device (sums all-reduced per pass)",
               "sums": "task sums sharded 1/N (reduce-scatter per micro-batch), weights whole",
               "params": "weights sharded with FSDP2 (one layer gathered at a time) and task sums "
                         "sharded 1/N (reduce-scatter per micro-batch)"}[plan.shard]
    tokens = f"{plan.micro_batch_tokens:,} padded tokens"
    group = f" of {rollout.group_size} completions" if rollout else ""
    interval = {"exact": "exact intervals: a second pass for the row sums",
                "sketch": "sketched intervals", "none": "no intervals"}[plan.intervals]
    sums = ("in host memory (pinned, added per micro-batch)" if plan.sums_location == "host"
            else "on the device")
    margin = f"{SAFETY_MARGIN:.0%}"
    return [
        f"micro-batch: {prompts_phrase(plan.micro_batch_prompts)}{group} ({tokens}){device}; "
        f"{gib(plan.prompt_bytes)} of activations and logits per prompt",
        f"passes: {plan.passes} ({interval}), {plan.micro_batches} micro-batches each",
        f"task sign sums: {sums}",
        *([f"{plan.devices} devices: {sharing}"] if plan.devices > 1 else []),
        f"peak per device: {gib(plan.peak_bytes)} of {gib(plan.usable_device_memory)} usable "
        f"({gib(plan.device_memory)} less a {margin} margin); host: {gib(plan.host_peak_bytes)} "
        f"of {gib(plan.host_memory)}",
    ]


def _advice(plan: ScanPlan) -> list[RenderableType]:
    advice = plan.advice
    if advice is None:
        return []
    need = f"needs {gib(advice.needs_device_memory)} per device as asked"
    if advice.needs_host_memory is not None:
        need += f"; host-resident sums need {gib(advice.needs_host_memory)} of host memory"
    table = Table(title="What would make it fit (each planned in full)", title_justify="left")
    table.add_column("option", overflow="fold")
    for header, justify in (("fits", "left"), ("peak/device", "right"), ("host", "right"),
                            ("sums", "left"), ("prompts/batch", "right")):
        table.add_column(header, justify=justify, no_wrap=True)
    for option in advice.options:
        table.add_row(option.flags, "yes" if option.fits else "no", gib(option.peak_bytes),
                      gib(option.host_peak_bytes), option.sums_location, str(option.micro_batch_prompts))
    parts: list[RenderableType] = [Text(need)]
    if advice.options:
        parts.append(table)
    if not any(option.fits for option in advice.options):
        parts.append(Text(
            f"No option fits: one prompt alone takes {gib(plan.prompt_bytes)} of activations and "
            "logits, and a prompt is never split; what is left is shorter completions "
            "(--completion-len), fewer completions per prompt (-k) or a device with more memory.",
            style="red"))
    return parts


def render_plan(plan: ScanPlan, model: str) -> RenderableType:
    """The plan as the console shows it."""
    selected = f"{plan.selected_parameters:,} of {plan.total_parameters:,} parameters selected"
    verdict = (Text("fits", style="bold green") if plan.fits
               else Text("does not fit", style="bold red"))
    return Group(
        Text(f"Scan plan for {model}: {selected}", style="bold"),
        _buffer_table(plan),
        *(Text(line) for line in _summary_lines(plan)),
        verdict,
        *_advice(plan),
    )
