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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from gradprobe.errors import UserInputError


class _LiteralHelp:
    """Help as written: typer renders help texts as rich markup, which swallowed `[default: 8]`
    and `share[code]`; and a flag's value is no `<bool>` the user could type."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.help = escape(self.help) if self.help else self.help
        for param in self.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
            _hide_flag_type(param)

    def get_help_option(self, ctx: typer.Context):  # type: ignore[no-untyped-def]
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _hide_flag_type(option)
        return option


def _hide_flag_type(param: object) -> None:
    if getattr(param, "is_flag", False) and not getattr(param, "metavar", None):
        param.metavar = ""  # type: ignore[attr-defined]


class Command(_LiteralHelp, TyperCommand):
    """A gradprobe subcommand (help as written)."""


class Group(_LiteralHelp, TyperGroup):
    """gradprobe and its `mix` group (help as written)."""


app = typer.Typer(
    cls=Group,
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
    _error_line(message)
    raise typer.Exit(2)


def _error_line(message: str) -> None:
    from rich.markup import escape

    stderr.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def _stated_warnings() -> Iterator[None]:
    """Print gradprobe's `InputWarning`s as ``warning:`` lines on stderr, every time they occur;
    other warnings go where they went before."""
    import warnings

    from rich.markup import escape

    from gradprobe.errors import InputWarning

    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            if issubclass(category, InputWarning):
                stderr.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False,
                             soft_wrap=True)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.simplefilter("always", InputWarning)
        warnings.showwarning = show
        yield


def _quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*batching rule.*")


@app.command(cls=Command)
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
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-k", help="Completions sampled per prompt (K) [default: 8]")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest completion; also L_max of --loss dr_grpo [default: 256]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature; log-probs use logits / temperature [default: 1.0]")] = None,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for the prompt subset and sampling; same seed, same scan.")] = 0,
    reward: Annotated[Optional[list[str]], typer.Option(help="TASK=SPEC per task, or SPEC as the default. Built in: exact, numeric, regex:PATTERN, math, countdown, python_tests, format[:STYLE]; or package.module:function (written for gradprobe, verl's compute_score or TRL, told apart by its parameters). Several with weights: TASK=math+0.2*format (a term with :VALUE goes last).")] = None,
    reward_workers: Annotated[int, typer.Option(help="Worker processes for the rewards (slow verifiers); 1 scores in this process. Same results either way.")] = 1,
    truncate_prompts: Annotated[bool, typer.Option("--truncate-prompts", help="Keep the last tokens of a prompt too long for the model's positions (with --max-new-tokens) instead of stopping with an error.")] = False,
    reward_timeout: Annotated[float, typer.Option(help="Seconds one completion's reward may take (0: no limit); a reward that runs longer stops the scan naming the task and prompt.")] = 60.0,
    allow_weak_sandbox: Annotated[bool, typer.Option("--allow-weak-sandbox", help="Where bubblewrap cannot run, let python_tests run model-written code under an in-process guard only (determined code can escape it). scan.json records the isolation used.")] = False,
    generate_batch_size: Annotated[int, typer.Option(help="Prompts per generation batch; each batch samples from its own seed (under torchrun, ranks take whole batches).")] = 16,
    advantage: Annotated[str, typer.Option(help="Advantage estimator: grpo, dr_grpo, rloo or none.")] = "grpo",
    loss: Annotated[str, typer.Option(help="Loss aggregation: grpo, bnpo, dapo, dr_grpo or rloo.")] = "grpo",
    params: Annotated[Optional[list[str]], typer.Option(help="Parameters to differentiate: all, last-block, attention, mlp, lora, or globs on names (repeatable) [default: all; lora with --adapter]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model weights: auto (bf16 on GPU, else float32), float32 or bfloat16. Gradient sums are float32.")] = "auto",
    max_memory: Annotated[Optional[float], typer.Option(help="GiB the gradient stage may use [default: what the device has free]; sets the micro-batch (hooks) or chunk (vmap) size.")] = None,
    engine: Annotated[str, typer.Option(help="Gradient engine: auto (hooks when the model allows, else vmap), hooks (one forward+backward per micro-batch, per-module hooks: fastest) or vmap (torch.func per unit: any model). Same numbers to rounding; memory flat in the number of prompts either way.")] = "auto",
    chunk_size: Annotated[Optional[int], typer.Option(help="vmap engine: units (prompt x advantage sign) per vmapped gradient call [default: from --max-memory]; halved automatically on out-of-memory.")] = None,
    checkpoint_activations: Annotated[bool, typer.Option("--checkpoint-activations", help="Keep only each decoder layer's input and recompute the layer in backward: much less memory for long completions, about one more forward (benchmarks/RESULTS.md).")] = False,
    intervals: Annotated[str, typer.Option(help="exact: a second pass gives every prompt's dot with its task gradient, for exact jackknife intervals (about 2x one pass); none: one pass, point estimates only.")] = "exact",
    sums: Annotated[str, typer.Option(help="Where the float32 task sums live: device, host (pinned memory, added per micro-batch: for models whose sums do not fit the GPU) or auto.")] = "auto",
    shard: Annotated[str, typer.Option(help="Under torchrun: params (weights sharded with FSDP2, task sums sharded by reduce-scatter), sums (only the sums), none (both whole on every rank, sums all-reduced) or auto (none when the plan fits one device, else params). Hooks engine.")] = "auto",
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
        checkpoint_activations=checkpoint_activations, intervals=intervals, sums=sums, shard=shard,
        stats=stats, proxy_check=proxy_check,
        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        adapter=None if adapter is None else str(adapter), reward_workers=reward_workers,
        allow_weak_sandbox=allow_weak_sandbox, reward_timeout_s=reward_timeout,
        truncate_prompts=truncate_prompts,
        generate_batch_size=generate_batch_size,
        task_grads_limit_mb=task_grads_limit, task_grads_seed=task_grads_seed, **settings,
    )
    _quiet_libraries()
    from gradprobe.distributed import DistributedFailure, open_session

    def report(error: BaseException) -> None:  # rank 0 of a torchrun scan: the one message
        if isinstance(error, (UserInputError, DistributedFailure)):
            _error_line(str(error))

    session = None
    try:
        with _stated_warnings(), open_session(config.device, report) as session:
            result = run_scan(config, RichProgress(stderr) if session.is_writer else None)
    except UserInputError as exc:
        if session is not None and session.is_distributed:
            raise typer.Exit(2) from None
        fail(str(exc))
    except DistributedFailure:
        raise typer.Exit(1) from None
    if not session.is_writer:
        return
    if as_json:
        print(json.dumps(result.document, indent=2))
    else:
        stdout.print(render_scan(result.document))
        stdout.print(f"wrote {result.out}/", style="dim")


@app.command(cls=Command)
def report(
    scan_dir: Annotated[Path, typer.Argument(metavar="SCAN", help="A scan directory (or its scan.json), or a training run's gradprobe.jsonl.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the versioned JSON report (scan.json plus checks and alerts; schema gradprobe/schema/report.schema.json).")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print GitHub markdown, e.g. for a pull-request comment.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Write one self-contained HTML page with the tables and pictures (needs the plots extra).")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write the pictures as PNGs into DIR (needs the plots extra).")] = None,
    fail_on: Annotated[Optional[list[str]], typer.Option("--fail-on", metavar="EXPR", help="Exit 1 when EXPR holds, e.g. max_norm_ratio>8, min_cosine<-0.2, share[*]>0.6 (repeatable; a bad EXPR exits 2 and lists the names).")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", metavar="POLICY", help="Task weights for the next run from a scan or a track: equalise-share, gain-per-gradient (a track) or inverse-noise (README, formulas and caution).")] = None,
    weights_out: Annotated[Optional[Path], typer.Option("--weights-out", metavar="FILE", help="Write the weights JSON (TaskWeightedSampler reads it) and FILE's .roll.yaml (ROLL's domain_interleave_probs).")] = None,
) -> None:
    """Show a saved scan or track again: tables, --markdown, --json, an --html page, --plots; --fail-on for CI;
    --weights for the next run's task weights.

    Examples:

      gradprobe report gradprobe-scan-demo

      gradprobe report gradprobe-scan-demo --json --fail-on 'max_norm_ratio>8' --fail-on 'share[count]>0.6'

      gradprobe report gradprobe-scan-demo --markdown > comment.md

      gradprobe report gradprobe-scan-demo --html report.html --plots pictures/

      gradprobe report run/gradprobe.jsonl --plots pictures/
    """
    from gradprobe.alerts import SCAN_METRICS, run_checks
    from gradprobe.artifacts import read_scan
    from gradprobe.track import read_track

    if as_json and markdown:
        fail("--json and --markdown both print to stdout; choose one")
    if scan_dir.suffix == ".jsonl":  # a training run's series of probes (the TRL callback's file)
        if markdown or html or fail_on:
            fail("a gradprobe.jsonl series takes --json and --plots only")
        _report_series(scan_dir, as_json, plots)
        return
    if weights_out is not None and weights is None:
        fail("--weights-out writes the weights of --weights POLICY; give a policy")
    tracked = read_track(scan_dir)
    if weights is not None or tracked is not None:
        if fail_on or html or plots:
            fail("--fail-on, --html and --plots apply to a scan report, not to --weights or a track")
        _report_track_or_weights(scan_dir, tracked, weights, weights_out, as_json, markdown)
        return
    try:
        document = read_scan(scan_dir)
        checks = run_checks(list(fail_on or []), SCAN_METRICS, document, list(document["tasks"]))
        figures = _figures(document, "scan", html, plots)
    except UserInputError as exc:
        fail(str(exc))
    _deliver(document, "scan", checks, figures, as_json, markdown, html, plots)


def _print_document(document: dict, as_json: bool, markdown: bool, to_markdown: Callable[[dict], str],
                    render: Callable[[dict], Any]) -> None:
    """A report document as JSON, markdown or a rich view, as the flags ask."""
    if as_json:
        print(json.dumps(document, indent=2))
    elif markdown:
        print(to_markdown(document), end="")
    else:
        stdout.print(render(document))


def _report_track_or_weights(path: Path, tracked: Optional[dict], policy: Optional[str],
                             weights_out: Optional[Path], as_json: bool, markdown: bool) -> None:
    """`report TRACK` (its series), or `report SCAN_OR_TRACK --weights POLICY` (weights, written
    with --weights-out)."""
    if policy is None:
        from gradprobe.views.track_view import render_track, track_markdown

        _print_document(tracked, as_json, markdown, track_markdown, render_track)
        return
    from gradprobe.artifacts import read_scan
    from gradprobe.views.weights_view import render_weights, weights_markdown
    from gradprobe.weights import weights_document, write_weights

    try:
        document = weights_document(tracked if tracked is not None else read_scan(path), policy, str(path))
        written = write_weights(weights_out, document) if weights_out is not None else []
    except UserInputError as exc:
        fail(str(exc))
    _print_document(document, as_json, markdown, weights_markdown, render_weights)
    if written:
        stderr.print(f"wrote {', '.join(map(str, written))}", style="dim", highlight=False)


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
    from gradprobe.views.console import render_checks, render_compare, render_scan

    fired = [c for c in checks if c["fired"]]
    if as_json:
        print(json.dumps({**document, "alerts": fired, "checks": checks}, indent=2))
    elif markdown:
        to_markdown = markdown_view.scan_markdown if kind == "scan" else markdown_view.compare_markdown
        print(to_markdown(document, checks), end="")
    else:
        stdout.print(render_scan(document) if kind == "scan" else render_compare(document))
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


@app.command(cls=Command)
def compare(
    scan_a: Annotated[Path, typer.Argument(metavar="A", help="Scan of the earlier checkpoint.")],
    scan_b: Annotated[Optional[Path], typer.Argument(metavar="[B]", help="Scan of the later checkpoint, same tasks and prompts.", show_default=False)] = None,
    log: Annotated[Optional[Path], typer.Option("--log", metavar="FILE", help="Training log (CSV/JSONL: step, task, reward) or a `gradprobe gains --out` JSON: windowed gains beside A's gradients.")] = None,
    window: Annotated[Optional[int], typer.Option(help="Steps per window of the log gain [default: 10]")] = None,
    step: Annotated[Optional[float], typer.Option(help="Log step at which the gain is taken [default: the earliest with full windows].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the versioned JSON (schema gradprobe/schema/compare.schema.json).")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print GitHub markdown.")] = False,
    html: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="Write one self-contained HTML page (needs the plots extra).")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", metavar="DIR", help="Write the gain-against-gradient picture into DIR (needs the plots extra).")] = None,
    fail_on: Annotated[Optional[list[str]], typer.Option("--fail-on", metavar="EXPR", help="Exit 1 when EXPR holds, e.g. min_drift_cosine<0.5, gain[*]<0 (repeatable).")] = None,
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


@app.command(cls=Command)
def track(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="The run's output directory: TRL's checkpoint-N or verl's global_step_N/actor/huggingface checkpoints (or --checkpoints-glob).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Track directory: scans/step-N per checkpoint (kept; a rerun resumes), track.json, track.md, plots/.")],
    mix: Annotated[Optional[Path], typer.Option(help="The run's training data: fresh rollouts come from it, and verl dumps are mapped back to its tasks.")] = None,
    rollouts_glob: Annotated[Optional[str], typer.Option(help="Glob under RUN_DIR of the trainer's rollout dumps, numbered by step: verl's trainer.rollout_data_dir {step}.jsonl or the TRL callback's JSONL (README).")] = None,
    checkpoints_glob: Annotated[Optional[str], typer.Option(help="Glob under RUN_DIR of checkpoint directories; a match's step is the last number in its path.")] = None,
    every: Annotated[int, typer.Option(help="Scan the first checkpoint and every K-th after it.")] = 1,
    window: Annotated[int, typer.Option(help="Steps per window w of the learning gain.")] = 10,
    group_size: Annotated[int, typer.Option("--group-size", "-k", help="Fresh rollouts: completions per prompt.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest completion (fresh rollouts); also L_max of --loss dr_grpo.")] = 256,
    prompts_per_task: Annotated[Optional[int], typer.Option(help="Fresh rollouts: seeded subset size per task.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; log-probs use logits / temperature.")] = 1.0,
    reward: Annotated[Optional[list[str]], typer.Option(help="Fresh rollouts: TASK=SPEC or SPEC, as scan's --reward.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompt subset and sampling.")] = 0,
    advantage: Annotated[str, typer.Option(help="Advantage estimator: grpo, dr_grpo, rloo or none.")] = "grpo",
    loss: Annotated[str, typer.Option(help="Loss aggregation: grpo, bnpo, dapo or dr_grpo.")] = "grpo",
    params: Annotated[Optional[list[str]], typer.Option(help="Parameters to differentiate, as scan's --params.  [default: all]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16.")] = "auto",
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write plots/ (share over steps, gain over steps, share against gain) when matplotlib is installed.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print track.json (schema gradprobe/schema/track.schema.json).")] = False,
) -> None:
    """Scan every checkpoint of a training run and relate gradient share to learning gain over time.

    Per checkpoint: the trainer's rollout dump for that step (scanned offline) or fresh rollouts
    from MIX; per task and step: share, grad_norm, the unbiased squared norm with its interval,
    rewards and the windowed learning gain; across tasks and steps: Spearman of share and gain.

    Examples:

      gradprobe track ./checkpoints/grpo --mix data/train.parquet --rollouts-glob 'rollouts/*.jsonl' --out ./checkpoints/grpo/gradprobe-track

      gradprobe track ./checkpoints/trl-grpo --mix mix.jsonl --every 2 -k 8 --out ./checkpoints/trl-grpo/gradprobe-track
    """
    from gradprobe.track import TrackConfig
    from gradprobe.track import track as run_track
    from gradprobe.views.console import RichProgress
    from gradprobe.views.track_view import render_track

    config = TrackConfig(
        run_dir=str(run_dir), out=str(out), mix=None if mix is None else str(mix), rollouts_glob=rollouts_glob,
        checkpoints_glob=checkpoints_glob, every=every, window=window, plots=plots,
        scan={"group_size": group_size, "max_new_tokens": max_new_tokens, "prompts_per_task": prompts_per_task,
              "temperature": temperature, "rewards": list(reward or []), "seed": seed, "advantage": advantage,
              "loss": loss, "params": list(params or ["all"]), "device": device, "dtype": dtype},
    )
    _quiet_libraries()
    try:
        result = run_track(config, RichProgress(stderr))
    except UserInputError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result.document, indent=2))
    else:
        stdout.print(render_track(result.document))
    kept = f"; kept {len(result.reused)} earlier scan(s)" if result.reused else ""
    stderr.print(f"scanned {len(result.scanned)} checkpoint(s){kept}; wrote {result.out}/track.json", style="dim",
                 highlight=False)
    if isinstance(result.plots, str):
        stderr.print(f"no plots: {result.plots}", style="dim", highlight=False)


@app.command(cls=Command)
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
    from gradprobe.views.console import render_gains

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
    devices: Annotated[int, typer.Option(help="Devices (torchrun ranks); each holds its micro-batch's activations.")] = 1,
    shard: Annotated[str, typer.Option(help="With several devices: params (weights sharded with FSDP2, task sums sharded), sums (only the sums), none (both whole on each), or auto (none when that fits, else params).")] = "auto",
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
            checkpoint_activations=checkpoint_activations, sums=sums, device_kind=device, shard=shard)
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


mix_app = typer.Typer(cls=Group, help="Look at a mix before spending GPU time on it.", no_args_is_help=True)
app.add_typer(mix_app, name="mix")


@mix_app.command("inspect", cls=Command)
def mix_inspect(
    mix: Annotated[Path, typer.Argument(metavar="MIX", help="A mix file, a folder of data files or one saved by datasets, or a .toml mix spec.")],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint whose tokenizer and chat template render the sample prompts.")] = None,
    task_field: Annotated[str, typer.Option(help="Mix column holding the task name.")] = "task",
    prompt_field: Annotated[str, typer.Option(help="Mix column holding the prompt.")] = "prompt",
    answer_field: Annotated[str, typer.Option(help="Mix column holding the reference answer.")] = "answer",
    split: Annotated[Optional[str], typer.Option(help="Split of a MIX folder to read (a saved DatasetDict, or data files split by name).  [default: train]", show_default=False)] = None,
    reward: Annotated[Optional[list[str]], typer.Option(help="As scan's --reward (TASK=SPEC, or SPEC as the default): preview each task's effective reward and where it comes from.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the tokenizer's own Python code to run.")] = False,
) -> None:
    """Print a mix's tasks, counts, detected format and field mapping, and one prompt per task.

    With --model the prompts are shown exactly as the scan feeds them to the model (chat
    template applied, special tokens included); without it, raw.

    Examples:

      gradprobe mix inspect mix.jsonl --reward count=numeric --reward exact

      gradprobe mix inspect mix.toml --model ./my-checkpoint
    """
    from gradprobe.mix import load_mix
    from gradprobe.mix.spec import task_rewards
    from gradprobe.model_loading import load_tokenizer
    from gradprobe.pipeline import ScanConfig
    from gradprobe.rewards import effective_rewards, parse_reward_options
    from gradprobe.views.mix_view import render_mix, sample_prompts

    try:
        with _stated_warnings():
            loaded = load_mix(mix, task_field, prompt_field, answer_field, split)
        configured, options = task_rewards(loaded), list(reward or [])
        default = {f.name: f.default for f in fields(ScanConfig)}["default_reward"]
        chosen = parse_reward_options(options, loaded.tasks, default, configured)
        rewards = effective_rewards(options, chosen, configured) if options else None
        tokenizer = None
        if model is not None:
            _quiet_libraries()
            tokenizer = load_tokenizer(model, trust_remote_code)
        samples = sample_prompts(loaded, tokenizer)
    except UserInputError as exc:
        fail(str(exc))
    stdout.print(render_mix(loaded, samples, rewards))


def main() -> None:
    """Entry point for the `gradprobe` script.

    Ctrl-C and SIGTERM raise `Stopped` (which click, unlike KeyboardInterrupt, does not turn
    into "Aborted!"), so every ``finally`` runs: workers and sandboxes are stopped, staging
    directories removed. One line, then exit 130 or 143.
    """
    import signal

    from gradprobe.errors import Stopped

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    from gradprobe.distributed.session import launched_by_torchrun, leave_process

    try:
        try:
            app()
        except (Stopped, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
            stderr.print("interrupted" if signum == signal.SIGINT else "terminated", highlight=False)
            sys.exit(128 + signum)
    except SystemExit as exc:
        if not launched_by_torchrun():
            raise
        # a torchrun rank leaves without finalizing the interpreter (`leave_process` says why)
        leave_process(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))


if __name__ == "__main__":
    main()
