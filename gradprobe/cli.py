"""The gradprobe command line: parses flags, calls the pipeline, maps errors to exit codes.

Exit codes: 0 success, 1 a --fail-on alert fired, 2 bad input (one line on stderr, no traceback).
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
    stderr.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
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
    mix: Annotated[Optional[Path], typer.Argument(help="Task-labelled prompts: .jsonl, .json, .parquet, .csv or a datasets directory.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Scan directory to write (must not exist unless --overwrite).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing scan directory.")] = False,
    demo: Annotated[bool, typer.Option("--demo", help="Scan the tiny model and mix that ship with gradprobe.")] = False,
    rollouts: Annotated[Optional[Path], typer.Option(help="Scan a trainer's rollouts (JSONL/Parquet) instead of sampling.")] = None,
    task_field: Annotated[str, typer.Option(help="Mix column holding the task name.")] = "task",
    prompt_field: Annotated[str, typer.Option(help="Mix column holding the prompt (string or chat messages).")] = "prompt",
    answer_field: Annotated[str, typer.Option(help="Mix column holding the reference answer.")] = "answer",
    prompts_per_task: Annotated[Optional[int], typer.Option(help="Seeded subset size, equal for every task [default: the smallest task's size].")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-k", help="Completions sampled per prompt (K).  [default: 8]")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest completion; also L_max of --loss dr_grpo.  [default: 256]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature; log-probs use logits / temperature.  [default: 1.0]")] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for the prompt subset and sampling; same seed, same scan.")] = 0,
    reward: Annotated[Optional[list[str]], typer.Option(help="TASK=NAME per task, or NAME as the default. Built in: exact, numeric, regex:PATTERN; or package.module:function.")] = None,
    advantage: Annotated[str, typer.Option(help="Advantage estimator: grpo, dr_grpo, rloo or none.")] = "grpo",
    loss: Annotated[str, typer.Option(help="Loss aggregation: grpo, bnpo, dapo or dr_grpo.")] = "grpo",
    params: Annotated[Optional[list[str]], typer.Option(help="Parameters to differentiate: all, last-block, attention, mlp, lora, or globs on names (repeatable).  [default: all]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model weights: auto (bf16 on GPU, else float32), float32 or bfloat16. Gradient sums are float32.")] = "auto",
    max_memory: Annotated[Optional[float], typer.Option(help="GiB the gradient stage may use [default: what the device has free]; sets the chunk size.")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(help="Units (prompt x advantage sign) per vmapped gradient call [default: from --max-memory]; halved automatically on out-of-memory.")] = None,
    checkpoint_activations: Annotated[bool, typer.Option("--checkpoint-activations", help="Recompute each layer's activations in backward: much less memory for long completions, about 1.5-3x slower.")] = False,
    proxy_check: Annotated[bool, typer.Option("--proxy-check/--no-proxy-check", help="With a --params subset on a model of at most 50M parameters, also run all parameters and report how well the subset ranks the tasks.")] = True,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Test per-prompt norms against reward, advantage, length and task.")] = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the norm-ratio intervals.")] = 1000,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled (.bin) weights, which can run code: only for files you trust.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a checkpoint's own Python code to run.")] = False,
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
    if mix is None and rollouts is None:
        fail("give a MIX file to sample from, or --rollouts FILE to scan a trainer's rollouts")
    if out is None:
        out = Path("gradprobe-scan-demo" if demo else "gradprobe-scan")
    config = ScanConfig(
        model=model, mix=None if mix is None else str(mix),
        rollouts=None if rollouts is None else str(rollouts), out=str(out), overwrite=overwrite,
        task_field=task_field, prompt_field=prompt_field, answer_field=answer_field,
        top_p=top_p, seed=seed, rewards=rewards, advantage=advantage, loss=loss,
        params=list(params or ["all"]), device=device, dtype=dtype, chunk_size=chunk_size, max_memory_gib=max_memory,
        checkpoint_activations=checkpoint_activations,
        stats=stats, bootstrap=bootstrap, proxy_check=proxy_check,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, **settings,
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
    scan_dir: Annotated[Path, typer.Argument(metavar="SCAN", help="A scan directory (or its scan.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the versioned JSON report.")] = False,
) -> None:
    """Show a saved scan again."""
    from gradprobe.artifacts import read_scan
    from gradprobe.views.console import render_scan

    try:
        document = read_scan(scan_dir)
    except UserInputError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        stdout.print(render_scan(document))


def main() -> None:
    """Entry point for the `gradprobe` script."""
    try:
        app()
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
