"""The gradprobe command line: parses flags, calls the pipeline, maps errors to exit codes.

Exit codes: 0 success, 1 a --fail-on alert fired (plan: the scan does not fit), 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import os

# Never reach a hub: models and data come from disk or the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from gradprobe.errors import UserInputError

app = typer.Typer(
    help="Measure per-task gradient imbalance in multi-task RL post-training of LLMs.\n\n"
    "Start with `gradprobe scan --demo`, then `gradprobe scan MODEL MIX --out DIR`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console()
stderr = Console(stderr=True)

# Settings of the embedded demo: small enough for under a minute on two CPU cores.
DEMO_SETTINGS = {"prompts_per_task": 48, "group_size": 8, "max_new_tokens": 10, "temperature": 1.0}


def fail(message: str) -> None:
    """Print one error line and exit 2."""
    from rich.markup import escape

    stderr.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*batching rule.*")


@app.command()
def scan(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint directory, or a hub id in the local cache.", show_default=False)] = None,
    mix: Annotated[Optional[Path], typer.Argument(help="Task-labelled prompts: .jsonl, .json, .parquet, .csv, a folder of such files (verl's data/gsm8k/train.parquet, ...) or one saved by datasets (gradprobe, verl or TRL columns, detected), or a .toml mix spec.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Scan directory to write (must not exist unless --overwrite) [default: gradprobe-scan; with --demo gradprobe-scan-demo, replaced on a rerun].")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing scan directory.")] = False,
    demo: Annotated[bool, typer.Option("--demo", help="Scan the tiny model and mix that ship with gradprobe.")] = False,
    rollouts: Annotated[Optional[Path], typer.Option(help="Scan a trainer's rollouts (JSONL/Parquet) instead of sampling.")] = None,
    task_field: Annotated[str, typer.Option(help="Mix column holding the task name.")] = "task",
    prompt_field: Annotated[str, typer.Option(help="Mix column holding the prompt (string or chat messages).")] = "prompt",
    answer_field: Annotated[str, typer.Option(help="Mix column holding the reference answer.")] = "answer",
    split: Annotated[Optional[str], typer.Option(help="Split of a MIX folder to read: a DatasetDict saved with save_to_disk, or a folder of data files split by their names like verl's data/gsm8k/{train,test}.parquet.  [default: train]", show_default=False)] = None,
    prompts_per_task: Annotated[Optional[int], typer.Option(help="Seeded subset size, equal for every task [default: the smallest task's size].")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-k", help="Completions sampled per prompt (K).  [default: 8]")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest completion; also L_max of --loss dr_grpo.  [default: 256]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature; log-probs use logits / temperature.  [default: 1.0]")] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for the prompt subset and sampling; same seed, same scan.")] = 0,
    reward: Annotated[Optional[list[str]], typer.Option(help="TASK=SPEC per task, or SPEC as the default. Built in: exact, numeric, regex:PATTERN, math, countdown, python_tests, format[:STYLE]; or package.module:function (written for gradprobe, verl's compute_score or TRL, told apart by its parameters). Several with weights: TASK=math+0.2*format (a term with :VALUE goes last).")] = None,
    reward_workers: Annotated[int, typer.Option(help="Worker processes for the rewards (slow verifiers); 1 scores in this process. Same results either way.")] = 1,
    advantage: Annotated[str, typer.Option(help="Advantage estimator: grpo, dr_grpo, rloo or none.")] = "grpo",
    loss: Annotated[str, typer.Option(help="Loss aggregation: grpo, bnpo, dapo, dr_grpo or rloo.")] = "grpo",
    params: Annotated[Optional[list[str]], typer.Option(help="Parameters to differentiate: all, last-block, attention, mlp, lora, or globs on names (repeatable).  [default: all; lora with --adapter]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model weights: auto (bf16 on GPU, else float32), float32 or bfloat16. Gradient sums are float32.")] = "auto",
    max_memory: Annotated[Optional[float], typer.Option(help="GiB the gradient stage may use [default: what the device has free]; sets the micro-batch (hooks) or chunk (vmap) size.")] = None,
    engine: Annotated[str, typer.Option(help="Gradient engine: auto (hooks when the model allows, else vmap), hooks (one forward+backward per micro-batch, per-module hooks: fastest) or vmap (torch.func per unit: any model, --checkpoint-activations). Same numbers to rounding; memory flat in the number of prompts either way.")] = "auto",
    chunk_size: Annotated[Optional[int], typer.Option(help="vmap engine: units (prompt x advantage sign) per vmapped gradient call [default: from --max-memory]; halved automatically on out-of-memory.")] = None,
    checkpoint_activations: Annotated[bool, typer.Option("--checkpoint-activations", help="Recompute each layer's activations in backward (vmap engine): much less memory for long completions, slower (benchmarks/RESULTS.md).")] = False,
    intervals: Annotated[str, typer.Option(help="exact: a second pass gives every prompt's dot with its task gradient, for exact jackknife intervals (about 2x one pass); none: one pass, point estimates only.")] = "exact",
    sums: Annotated[str, typer.Option(help="Where the float32 task sums live: device, host (pinned memory, added per micro-batch: for models whose sums do not fit the GPU) or auto.")] = "auto",
    proxy_check: Annotated[bool, typer.Option("--proxy-check/--no-proxy-check", help="With a --params subset on a model of at most 50M parameters, also run all parameters and report how well the subset ranks the tasks.")] = True,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Test per-prompt norms against reward, advantage, length and task.")] = True,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled (.bin) weights, which can run code: only for files you trust.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a checkpoint's own Python code to run.")] = False,
    adapter: Annotated[Optional[Path], typer.Option(help="A PEFT (LoRA) adapter directory on top of MODEL; --params then defaults to lora.")] = None,
    task_grads_limit: Annotated[float, typer.Option(help="MB up to which task_grads.safetensors holds the exact task gradients; above it (or when the disk cannot hold them), a seeded count sketch to 16384 dimensions (for compare's drift).")] = 64.0,
    task_grads_seed: Annotated[int, typer.Option(help="Seed of that count sketch; compare needs the same seed in both scans.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print scan.json instead of tables.")] = False,
) -> None:
    """Sample rollouts per task, score them, and measure per-task policy-gradient imbalance.

    Examples:

      gradprobe scan --demo

      gradprobe scan ./my-checkpoint mix.jsonl --out scans/step0 --reward math=numeric -k 8

      gradprobe scan ./my-checkpoint --rollouts trainer_rollouts.jsonl --out scans/batch17
    """
    from gradprobe.pipeline import ScanConfig
    from gradprobe.pipeline import scan as run_scan
    from gradprobe.views.console import RichProgress, render_scan

    settings = {"prompts_per_task": prompts_per_task, "group_size": group_size,
                "max_new_tokens": max_new_tokens, "temperature": temperature}
    rewards = list(reward or [])
    if demo:
        from gradprobe.demo import DEMO_MIX_PATH, DEMO_MODEL_DIR, DEMO_REWARDS

        if model is not None or mix is not None or rollouts is not None:
            fail("--demo brings its own model and mix; drop MODEL, MIX and --rollouts")
        model, mix = str(DEMO_MODEL_DIR), DEMO_MIX_PATH
        rewards = [f"{task}={name}" for task, name in DEMO_REWARDS.items()] + rewards
        settings = {k: DEMO_SETTINGS[k] if v is None else v for k, v in settings.items()}
    defaults = {f.name: f.default for f in fields(ScanConfig)}
    settings = {k: defaults[k] if v is None else v for k, v in settings.items()}
    if model is None:
        fail("give MODEL (a checkpoint directory) and MIX, or use --demo")
    if mix is not None and rollouts is not None:
        fail("give either MIX or --rollouts, not both")
    if split is not None and mix is None:
        fail("--split chooses the split of a MIX folder; give MIX")
    if mix is None and rollouts is None:
        fail("give a MIX file to sample from, or --rollouts FILE to scan a trainer's rollouts")
    if out is None:
        # The demo's own directory is replaced on a rerun (only if it holds a gradprobe scan).
        overwrite = overwrite or demo
        out = Path("gradprobe-scan-demo" if demo else "gradprobe-scan")
    config = ScanConfig(
        model=model, mix=None if mix is None else str(mix),
        rollouts=None if rollouts is None else str(rollouts), out=str(out), overwrite=overwrite,
        task_field=task_field, prompt_field=prompt_field, answer_field=answer_field, split=split,
        top_p=top_p, seed=seed, rewards=rewards, advantage=advantage, loss=loss,
        params=list(params or (["lora"] if adapter else ["all"])), device=device, dtype=dtype, engine=engine, chunk_size=chunk_size, max_memory_gib=max_memory,
        checkpoint_activations=checkpoint_activations, intervals=intervals, sums=sums,
        stats=stats, proxy_check=proxy_check,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        adapter=None if adapter is None else str(adapter), reward_workers=reward_workers,
        task_grads_limit_mb=task_grads_limit, task_grads_seed=task_grads_seed, **settings,
    )
    _quiet_libraries()
    try:
        result = run_scan(config, RichProgress(stderr))
    except UserInputError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result.document, indent=2))
    else:
        stdout.print(render_scan(result.document))
        stdout.print(f"wrote {result.out}/", style="dim")


@app.command()
def report(
    scan_dir: Annotated[Path, typer.Argument(metavar="SCAN", help="A scan directory (or its scan.json), or a training run's gradprobe.jsonl.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the versioned JSON report (scan.json plus checks and alerts; schema gradprobe/schema/report.schema.json).")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print GitHub markdown, e.g. for a pull-request comment.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Write one self-contained HTML page with the tables and pictures (needs the plots extra).")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write the pictures as PNGs into DIR (needs the plots extra).")] = None,
    fail_on: Annotated[Optional[list[str]], typer.Option("--fail-on", metavar="EXPR", help="Exit 1 when EXPR holds, e.g. max_norm_ratio>8, min_cosine<-0.2, share[code]>0.6 (repeatable; a bad EXPR exits 2 and lists the names).")] = None,
) -> None:
    """Show a saved scan again: tables, --markdown, --json, an --html page, --plots; --fail-on for CI.

    Examples:

      gradprobe report scans/step0

      gradprobe report scans/step0 --json --fail-on 'max_norm_ratio>8' --fail-on 'min_cosine<-0.2'

      gradprobe report scans/step0 --markdown > comment.md

      gradprobe report scans/step0 --html report.html --plots pictures/

      gradprobe report run/gradprobe.jsonl --plots pictures/
    """
    from gradprobe.alerts import SCAN_METRICS, run_checks
    from gradprobe.artifacts import read_scan

    if as_json and markdown:
        fail("--json and --markdown both print to stdout; choose one")
    if scan_dir.suffix == ".jsonl":
        if markdown or html or fail_on:
            fail("a gradprobe.jsonl series takes --json and --plots only")
        _report_series(scan_dir, as_json, plots)
        return
    try:
        document = read_scan(scan_dir)
        checks = run_checks(list(fail_on or []), SCAN_METRICS, document, list(document["tasks"]))
        figures = _figures(document, "scan", html, plots)
    except UserInputError as exc:
        fail(str(exc))
    _deliver(document, "scan", checks, figures, as_json, markdown, html, plots)


def _report_series(path: Path, as_json: bool, plots_dir: Optional[Path]) -> None:
    """A training run's gradprobe.jsonl: each task's share per probe step; --plots draws it."""
    from gradprobe.series import read_series
    from gradprobe.views.series_view import render_series

    try:
        series = read_series(path)
        if plots_dir is not None:
            from gradprobe.views import plots

            plots.require_matplotlib()
            written = plots.write_figures(plots_dir, {"share_over_steps.png": plots.share_over_steps_png(series)})
            stderr.print(f"wrote {', '.join(str(p) for p in written)}", style="dim", highlight=False)
    except UserInputError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(series.to_json(), indent=2))
    else:
        stdout.print(render_series(series))


def _deliver(document: dict, kind: str, checks: list[dict], figures: dict[str, bytes], as_json: bool,
             markdown: bool, html: Optional[Path], plots_dir: Optional[Path]) -> None:
    """Print a scan or comparison as JSON, markdown or tables, write its pictures, exit for alerts."""
    from gradprobe.views import markdown as markdown_view
    from gradprobe.views.tables import render_checks

    fired = [c for c in checks if c["fired"]]
    if as_json:
        print(json.dumps({**document, "alerts": fired, "checks": checks}, indent=2))
    elif markdown:
        to_markdown = markdown_view.scan_markdown if kind == "scan" else markdown_view.compare_markdown
        print(to_markdown(document, checks), end="")
    else:
        if kind == "scan":
            from gradprobe.views.console import render_scan

            stdout.print(render_scan(document))
        else:
            from gradprobe.views.tables import render_compare

            stdout.print(render_compare(document))
        if checks:
            stdout.print(render_checks(checks))
    _write_pictures(document, kind, figures, checks, html, plots_dir)
    _exit_for_alerts(fired, quiet=not (as_json or markdown))


def _figures(document: dict, kind: str, html: Optional[Path], plots_dir: Optional[Path]) -> dict[str, bytes]:
    """The PNGs of a scan or comparison when pictures are asked for; checks first that the
    output places can be written and matplotlib is there (UserInputError otherwise)."""
    if html is None and plots_dir is None:
        return {}
    if html is not None and not html.parent.resolve().is_dir():
        raise UserInputError(f"--html {html}: the directory {html.parent} does not exist")
    if plots_dir is not None and plots_dir.exists() and not plots_dir.is_dir():
        raise UserInputError(f"--plots {plots_dir}: exists and is not a directory")
    from gradprobe.views import plots

    plots.require_matplotlib()
    return plots.scan_figures(document) if kind == "scan" else plots.compare_figures(document)


def _write_pictures(document: dict, kind: str, figures: dict[str, bytes], checks: list[dict],
                    html: Optional[Path], plots_dir: Optional[Path]) -> None:
    from gradprobe.artifacts import write_text

    try:
        if plots_dir is not None:
            from gradprobe.views.plots import write_figures

            written = write_figures(plots_dir, figures)
            stderr.print(f"wrote {', '.join(str(p) for p in written)}", style="dim", highlight=False)
        if html is not None:
            from gradprobe.views.html import compare_html, scan_html

            page = scan_html(document, figures, checks) if kind == "scan" else compare_html(document, figures, checks)
            write_text(html, page)
            stderr.print(f"wrote {html}", style="dim", highlight=False)
    except UserInputError as exc:
        fail(str(exc))


def _exit_for_alerts(fired: list[dict], quiet: bool) -> None:
    """Exit 1 when a --fail-on check fired; with JSON or markdown on stdout, name them on stderr."""
    if not fired:
        return
    if not quiet:
        for check in fired:
            stderr.print(f"ALERT {check['message']}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def compare(
    scan_a: Annotated[Path, typer.Argument(metavar="A", help="Scan of the earlier checkpoint.")],
    scan_b: Annotated[Optional[Path], typer.Argument(metavar="[B]", help="Scan of the later checkpoint, same tasks and prompts.", show_default=False)] = None,
    log: Annotated[Optional[Path], typer.Option("--log", metavar="FILE", help="Training log (CSV/JSONL: step, task, reward) or a `gradprobe gains --out` JSON: windowed gains beside A's gradients.")] = None,
    window: Annotated[Optional[int], typer.Option(help="Steps per window of the log gain.  [default: 10]")] = None,
    step: Annotated[Optional[float], typer.Option(help="Log step at which the gain is taken [default: the earliest with full windows].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the versioned JSON (schema gradprobe/schema/compare.schema.json).")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print GitHub markdown.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Write one self-contained HTML page (needs the plots extra).")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write the gain-against-gradient picture into DIR (needs the plots extra).")] = None,
    fail_on: Annotated[Optional[list[str]], typer.Option("--fail-on", metavar="EXPR", help="Exit 1 when EXPR holds, e.g. min_drift_cosine<0.5, gain[math]<0 (repeatable).")] = None,
) -> None:
    """Learning gains and gradient drift between two scans (A before, B after training), or A and a log.

    Per task: the gain in mean reward, the change of grad_norm, norm_ratio and share, the gain per
    unit squared gradient, the drift cos(g_t under A, g_t under B); across tasks, Spearman of A's
    grad_sq_norm and share against the gain.

    Examples:

      gradprobe compare scans/step0 scans/step400

      gradprobe compare scans/step0 --log train_log.jsonl --window 20

      gradprobe compare scans/step0 scans/step400 --json --fail-on 'min_drift_cosine<0.2'
    """
    from gradprobe.alerts import COMPARE_METRICS, run_checks
    from gradprobe.compare import compare_paths

    if as_json and markdown:
        fail("--json and --markdown both print to stdout; choose one")
    if scan_b is None and log is None:
        fail("give a second scan B, or a training log with --log")
    if log is None and (window is not None or step is not None):
        fail("--window and --step apply to --log only")
    try:
        document = compare_paths(scan_a, scan_b, log, window, step)
        checks = run_checks(list(fail_on or []), COMPARE_METRICS, document, list(document["tasks"]))
        figures = _figures(document, "compare", html, plots)
    except UserInputError as exc:
        fail(str(exc))
    _deliver(document, "compare", checks, figures, as_json, markdown, html, plots)


@app.command()
def gains(
    log: Annotated[Path, typer.Argument(metavar="LOG", help="Training log, CSV or JSONL, one row per (step, task, reward); several rows per step are averaged.")],
    window: Annotated[int, typer.Option(help="Steps per window w.")] = 10,
    step: Annotated[Optional[float], typer.Option(help="Step s at which the gain is reported [default: the earliest with full windows].")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help="Write the gains JSON here (for compare --log).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the gains JSON (schema gradprobe/schema/gains.schema.json).")] = False,
    step_field: Annotated[str, typer.Option(help="Log column holding the training step.")] = "step",
    task_field: Annotated[str, typer.Option(help="Log column holding the task name.")] = "task",
    reward_field: Annotated[str, typer.Option(help="Log column holding the reward.")] = "reward",
) -> None:
    """Learning gains from a training log: gain_t(s) = mean R_t(s+1..s+w) - mean R_t(s-w..s-1).

    Examples:

      gradprobe gains train_log.csv --window 20

      gradprobe gains train_log.jsonl --window 20 --step 0 --out gains.json
    """
    from gradprobe.artifacts import write_json
    from gradprobe.gains import log_gains, read_log
    from gradprobe.views.tables import render_gains

    try:
        document = log_gains(read_log(log, step_field, task_field, reward_field), window, step, str(log))
        if out is not None:
            if not out.parent.resolve().is_dir():
                raise UserInputError(f"--out {out}: the directory {out.parent} does not exist")
            write_json(out, document)
    except UserInputError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        stdout.print(render_gains(document))
        if out is not None:
            stdout.print(f"wrote {out}", style="dim")


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="Checkpoint directory, a directory with only config.json, or a hub id in the local cache; built on the meta device, no weights read.")],
    tasks: Annotated[int, typer.Option("--tasks", help="Tasks in the mix (T).")],
    device_memory: Annotated[float, typer.Option("--device-memory", help="GiB of memory per device (141 GB = 131.3 GiB).")],
    prompts_per_task: Annotated[int, typer.Option(help="Prompts per task (N).")] = 64,
    group_size: Annotated[int, typer.Option("--group-size", "-k", help="Completions per prompt (K).")] = 8,
    prompt_len: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = 256,
    completion_len: Annotated[int, typer.Option(help="Longest completion, in tokens (scan's --max-new-tokens).")] = 256,
    dtype: Annotated[str, typer.Option(help="Model weights: bfloat16, float16 or float32. Sums are float32.")] = "bfloat16",
    host_memory: Annotated[Optional[float], typer.Option(help="GiB of host memory for host-resident sums, shared by the devices; by default this machine's.")] = None,
    devices: Annotated[int, typer.Option(help="Devices, weights and sums sharded with FSDP2; activations per device.")] = 1,
    params: Annotated[Optional[list[str]], typer.Option(help="Parameters to differentiate, as scan's --params: all, last-block, attention, mlp, or globs (repeatable).  [default: all]")] = None,
    intervals: Annotated[str, typer.Option(help="exact (a second pass), sketch (per-unit sketches) or none.")] = "exact",
    checkpoint_activations: Annotated[bool, typer.Option("--checkpoint-activations", help="Keep only each decoder layer's input; recompute one layer at a time in backward.")] = False,
    sums: Annotated[str, typer.Option(help="Where the task sign sums live: auto (the device when they fit there, else host), device or host.")] = "auto",
    device: Annotated[str, typer.Option(help="cuda or cpu (on CPU a micro-batch holds at most 4096 padded tokens).")] = "cuda",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (schema gradprobe/schema/plan.schema.json).")] = False,
) -> None:
    """Plan a scan's memory before loading anything: every buffer, the micro-batch, the passes.

    Exit 0 when it fits, 1 when it does not (with the options that would make it fit, each planned
    in full: --params subsets, host-resident sums, --checkpoint-activations, more --devices),
    2 for bad input.

    MODEL may be a folder holding only config.json. Examples:

      gradprobe plan ./qwen2-0.5b --tasks 4 --completion-len 512 --device-memory 80

      gradprobe plan ./qwen2-7b --tasks 4 --completion-len 1024 --device-memory 131.3 --json
    """
    from gradprobe.gradients.plan import PlanSettings, RolloutShape, dtype_bytes, plan_for_config
    from gradprobe.views.plan_view import render_plan

    _quiet_libraries()
    try:
        if device not in ("cuda", "cpu"):
            raise UserInputError(f"--device {device!r}: choose cuda or cpu")
        rollout = RolloutShape(tasks, prompts_per_task, group_size, prompt_len, completion_len)
        settings = PlanSettings(
            dtype_bytes=dtype_bytes(dtype), device_memory=_gib_bytes(device_memory, "--device-memory"),
            host_memory=_host_memory_bytes(host_memory), devices=devices, intervals=intervals,
            checkpoint_activations=checkpoint_activations, sums=sums, device_kind=device)
        planned = plan_for_config(_model_config(model), list(params or ["all"]), rollout, settings)
    except UserInputError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(planned.to_document(model), indent=2))
    else:
        stdout.print(render_plan(planned, model))
    if not planned.fits:
        raise typer.Exit(1)


def _gib_bytes(gib: float, flag: str) -> int:
    if not gib > 0:
        raise UserInputError(f"{flag} must be a positive number of GiB, got {gib}")
    return int(gib * (1 << 30))


def _host_memory_bytes(gib: Optional[float]) -> int:
    """--host-memory in bytes; by default this machine's physical memory."""
    from gradprobe.gradients.plan import physical_host_memory

    return physical_host_memory() if gib is None else _gib_bytes(gib, "--host-memory")


def _model_config(spec: str):
    """The transformers config of MODEL (a directory with config.json, or a cached hub id)."""
    from transformers import AutoConfig

    from gradprobe.model_loading import resolve_model_path

    path = resolve_model_path(spec)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(f"{spec}: cannot read its config.json ({str(exc).splitlines()[0]})") from None


mix_app = typer.Typer(help="Look at a mix before spending GPU time on it.", no_args_is_help=True)
app.add_typer(mix_app, name="mix")


@mix_app.command("inspect")
def mix_inspect(
    mix: Annotated[Path, typer.Argument(metavar="MIX", help="A mix file, a folder of data files or one saved by datasets, or a .toml mix spec.")],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint whose tokenizer and chat template render the sample prompts.")] = None,
    task_field: Annotated[str, typer.Option(help="Mix column holding the task name.")] = "task",
    prompt_field: Annotated[str, typer.Option(help="Mix column holding the prompt.")] = "prompt",
    answer_field: Annotated[str, typer.Option(help="Mix column holding the reference answer.")] = "answer",
    split: Annotated[Optional[str], typer.Option(help="Split of a MIX folder to read (a saved DatasetDict, or data files split by name).  [default: train]", show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the tokenizer's own Python code to run.")] = False,
) -> None:
    """Print a mix's tasks, counts, detected format and field mapping, and one prompt per task.

    With --model the prompts are shown exactly as the scan feeds them to the model (chat
    template applied, special tokens included); without it, raw.

    Example:

      gradprobe mix inspect mix.toml --model ./my-checkpoint
    """
    from gradprobe.mix import load_mix
    from gradprobe.model_loading import load_tokenizer
    from gradprobe.views.mix_view import render_mix, sample_prompts

    try:
        loaded = load_mix(mix, task_field, prompt_field, answer_field, split)
        tokenizer = None
        if model is not None:
            _quiet_libraries()
            tokenizer = load_tokenizer(model, trust_remote_code)
        samples = sample_prompts(loaded, tokenizer)
    except UserInputError as exc:
        fail(str(exc))
    stdout.print(render_mix(loaded, samples))


def main() -> None:
    """Entry point for the `gradprobe` script."""
    try:
        app()
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
