"""The scan under torchrun (gloo, CPU): equal to the one-process scan, and failing together.

Each distributed scan runs `python -m torch.distributed.run ... -m gradprobe scan` as a
subprocess, replicated (`--shard none`) or sharded (`--shard params`: FSDP2 weights and
reduce-scattered sums; `--shard sums`). Models run in float64 so the sums' rounding (float32 sums add in another order when
ranks share the prompts) stays far below the 1e-6 relative tolerance every number is held to;
one float32 run checks the default precision with its own tolerance.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl
from gradprobe import task_grads
from gradprobe.cli import app
from gradprobe.distributed.data_parallel import assign_prompts, prompt_costs, restrict_to_prompts
from gradprobe.distributed.rollouts import batch_rollout_counts, split_by_batch
from gradprobe.distributed.session import DistributedFailure, raise_shared_failure
from gradprobe.errors import UserInputError
from gradprobe.gradients.engine import UnitBatch
from gradprobe.rollouts import batch_seed

ROOT = Path(__file__).resolve().parents[1]
SCAN = ["-k", "3", "--max-new-tokens", "5", "--prompts-per-task", "5", "--reward", "add=numeric",
        "--reward", "regex:[a-m]", "--generate-batch-size", "2", "--no-stats"]
# Not compared: when and where it ran, how long, rank 0's own largest micro-batch, how it was shared.
NOT_COMPARED = {("created",), ("timings",), ("config", "out"), ("engine", "chunk_size"), ("engine", "processes"),
                ("config", "shard"), ("engine", "shard")}


def one_process(*args: object) -> None:
    result = CliRunner().invoke(app, ["scan", *map(str, args)])
    assert result.exit_code == 0, result.output


def torchrun(n: int, *args: object, env: dict[str, str] | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--standalone", "-m", "gradprobe", "scan", *map(str, args)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "OMP_NUM_THREADS": "1",
                   "GRADPROBE_COLLECTIVE_TIMEOUT": "60", **(env or {})}
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)
    # No rank may abort in the C++ runtime at exit ("terminate called without an active
    # exception" while the interpreter finalized: the ranks now leave by `leave_process`).
    assert ABORT not in run.stderr, run.stderr[-3000:]
    return run


ABORT = "terminate called without an active exception"


def differences(a: object, b: object, rel: float, abs_tol: float, path: tuple = ()) -> list[str]:
    """Where two scan documents differ: numbers beyond the tolerance, anything else at all."""
    if path in NOT_COMPARED:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{'/'.join(path)}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in differences(a[k], b[k], rel, abs_tol, (*path, k))]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{'/'.join(path)}: lengths {len(a)} and {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, rel, abs_tol, (*path, str(i)))]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=abs_tol) else [f"{'/'.join(path)}: {a} != {b}"]
    return [] if a == b else [f"{'/'.join(path)}: {a!r} != {b!r}"]


def scan_json(directory: Path) -> dict:
    return json.loads((directory / "scan.json").read_text())


def assert_same_scan(one: Path, many: Path, n: int, rel: float = 1e-6, abs_tol: float = 1e-12,
                     shard: str = "none") -> None:
    a, b = scan_json(one), scan_json(many)
    assert b["engine"]["processes"] == n and b["engine"]["shard"] == shard
    found = differences(a, b, rel, abs_tol)
    assert not found, found[:20]


def rollout_rows(directory: Path) -> list[dict]:
    """rollouts.jsonl without the gradient norm each row carries (compared in scan.json)."""
    rows = [json.loads(line) for line in (directory / "rollouts.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "prompt_grad_norm"} for row in rows]


@pytest.fixture(scope="module")
def scans(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """One-process scans (the reference) of the tiny model, sampled and offline."""
    root = tmp_path_factory.mktemp("distributed")
    mix = write_jsonl(root / "mix.jsonl", [
        {"task": "add", "prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
        [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)]] + [
        {"task": "echo", "prompt": f"say {w}:", "answer": w} for w in ["ab", "cd", "ef", "gh", "ij", "kl"]])
    one_process(tiny_llama, mix, "--out", root / "one", *SCAN, "--dtype", "float64")
    rows = [json.loads(line) for line in (root / "one" / "rollouts.jsonl").read_text().splitlines()]
    keys = ("task", "prompt_id", "prompt", "completion", "reward", "prompt_token_ids", "completion_token_ids")
    offline = write_jsonl(root / "offline.jsonl", [{k: r[k] for k in keys} for r in rows])
    # a projection of the task gradients (limit 0), whose sharded form is sketched per shard
    offline_args = ["--rollouts", offline, "--max-new-tokens", "5", "--no-stats", "--dtype", "float64",
                    "--params", "last-block", "--task-grads-limit", "0", "--intervals", "sketch"]
    one_process(tiny_llama, "--out", root / "one_offline", *offline_args)
    return {"root": root, "mix": mix, "one": root / "one", "offline_args": offline_args}


# Sampled rollouts, exact intervals (a second pass), saved exact task gradients and compare:
# replicated, and with FSDP2 weights and sharded sums (tied embeddings: the tiny Llama's).
@pytest.mark.parametrize("shard", ["none", "params"])
def test_two_processes_sample_and_scan_as_one(tiny_llama, scans, shard):
    out = scans["root"] / f"two_{shard}"
    run = torchrun(2, tiny_llama, scans["mix"], "--out", out, *SCAN, "--dtype", "float64", "--shard", shard)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_scan(scans["one"], out, 2, shard=shard)
    assert scan_json(out)["modules"]  # the per-module breakdown, compared above
    # the rollouts themselves: rank 1 sampled batches 1, 3, 5 from their own seeds
    assert rollout_rows(out) == rollout_rows(scans["one"])
    one, two = task_grads.read(scans["one"] / "task_grads.safetensors"), task_grads.read(out / "task_grads.safetensors")
    assert one.kind == two.kind == "exact" and one.params == two.params
    for name, value in one.tensors.items():
        torch.testing.assert_close(two.tensors[name], value, rtol=1e-6, atol=1e-12)
    against_itself = CliRunner().invoke(app, ["compare", str(scans["one"]), str(scans["one"]), "--json"])
    against_two = CliRunner().invoke(app, ["compare", str(scans["one"]), str(out), "--json"])
    assert against_two.exit_code == 0, against_two.output
    itself, two_doc = json.loads(against_itself.stdout), json.loads(against_two.stdout)
    found = differences(itself, two_doc, 1e-6, 1e-12)
    # B's directory and time, and the same-checkpoint warning's text, which names B's directory
    messages = {f"warnings/{i}/message" for i in range(len(itself.get("warnings", [])))}
    assert {d.split(":")[0] for d in found} <= {"b/path", "b/created"} | messages, found
    assert len(itself.get("warnings", [])) == len(two_doc.get("warnings", []))


def test_three_processes_offline_rollouts_sharded_sketches_and_a_proxy(tiny_llama, scans):
    """3 ranks do not divide the 10 prompts (some step empty on some rank), FSDP2 and sharded
    sums; sketched intervals; parameter subset with the full-model proxy check; the task
    gradients' projection made from the shards. (`--intervals none` is this pass 1 alone.)"""
    out = scans["root"] / "three"
    run = torchrun(3, tiny_llama, "--out", out, *scans["offline_args"], "--shard", "params")
    assert run.returncode == 0, run.stderr[-3000:]
    one = scans["root"] / "one_offline"
    assert_same_scan(one, out, 3, shard="params")
    assert scan_json(out)["proxy_fidelity"]["params"] == ["last-block"]
    a, b = task_grads.read(one / "task_grads.safetensors"), task_grads.read(out / "task_grads.safetensors")
    assert a.kind == b.kind == "projected" and (a.dim, a.seed, a.params) == (b.dim, b.seed, b.params)
    torch.testing.assert_close(b.tensors["projection"], a.tensors["projection"], rtol=1e-6, atol=1e-9)


def test_float32_sketch_intervals_on_three_processes_with_sharded_sums(tiny_llama, scans, tmp_path):
    """The default precision: the float32 sums add in another order across ranks, so numbers that
    come from cancellation (a cosine near 0, an unbiased norm) agree to 1e-6 of their scale.
    Sums sharded, weights whole on every rank (`--shard sums`)."""
    args = [tiny_llama, scans["mix"], *SCAN, "--intervals", "sketch"]
    one_process(*args, "--out", tmp_path / "one")
    run = torchrun(3, *args, "--out", tmp_path / "three", "--shard", "sums")
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_scan(tmp_path / "one", tmp_path / "three", 3, rel=1e-5, abs_tol=1e-6, shard="sums")


REWARD_MODULE = '''
import os
from gradprobe.errors import UserInputError

def score(completion, answer, **kwargs):
    if os.environ["RANK"] == "1":
        {failure}
    return 0.0
'''
FAILURES = {"UserInputError": 'raise UserInputError("the verifier is unreachable from this node")',
            "RuntimeError": 'raise RuntimeError("the verifier is unreachable from this node")',
            "crash": "os._exit(9)"}


def run_with_failing_reward(tiny_llama, scans, tmp_path, failure: str) -> subprocess.CompletedProcess:
    (tmp_path / "flaky_reward.py").write_text(REWARD_MODULE.format(failure=FAILURES[failure]))
    run = torchrun(2, tiny_llama, scans["mix"], "--out", tmp_path / "never", *SCAN, "--reward", "echo=flaky_reward:score",
                   env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), *sys.path])}, timeout=120)
    assert not (tmp_path / "never").exists()
    return run


# A reward that fails is a user error naming the task and prompt (exit 2), whatever it raised.
@pytest.mark.parametrize("error, exit_code", [("UserInputError", 2), ("RuntimeError", 2)])
def test_a_failing_rank_stops_every_rank_with_one_message(tiny_llama, scans, tmp_path, error, exit_code):
    run = run_with_failing_reward(tiny_llama, scans, tmp_path, error)
    output = run.stdout + run.stderr
    message = "error: rank 1: task 'echo', prompt 'echo-1': " + (
        "" if error == "UserInputError" else "reward 'flaky_reward:score' raised RuntimeError: ")
    assert output.count(message + "the verifier is unreachable from this node") == 1, output[-3000:]
    # torchrun's report: the first rank to leave left with the usual code (torchrun then ends
    # any rank still leaving, after rank 0 printed the message)
    assert run.returncode == 1 and f"exitcode  : {exit_code} " in output, output[-3000:]
    assert str(ROOT / "gradprobe") not in output, output[-3000:]  # one line: no traceback


def test_a_rank_that_dies_ends_the_job_without_a_hang(tiny_llama, scans, tmp_path):
    run = run_with_failing_reward(tiny_llama, scans, tmp_path, "crash")  # within the 120 s, not the 60 s timeout
    assert run.returncode == 1 and "exitcode  : 9 " in run.stderr, run.stderr[-3000:]


# ---- the pure parts -------------------------------------------------------------------------

def test_prompts_are_assigned_whole_and_balanced_by_tokens():
    costs = [9, 1, 5, 5, 3, 0, 7]
    owner = assign_prompts(costs, 3)
    assert owner == assign_prompts(costs, 3)  # every rank computes the same
    loads = [sum(c for c, r in zip(costs, owner) if r == rank) for rank in range(3)]
    assert sorted(loads) == [10, 10, 10]
    assert assign_prompts(costs, 1) == [0] * len(costs)


def test_a_rank_keeps_the_loss_of_its_own_prompts_only():
    batch = UnitBatch([[1, 2, 3], [1, 4], [5, 6], [5, 7, 8]], [[0, 1.0, 2.0], [0, -1.0], [0, 3.0], [0, 0, 0]],
                      [[0], [1], [2], [3]])
    prompts = [[0, 1], [2, 3]]
    assert prompt_costs(batch, prompts) == [5, 5]
    mine = restrict_to_prompts(batch, prompts, {1})
    assert [mine.is_active(u) for u in range(4)] == [False, False, True, False]
    assert mine.coefficients[2] == [0, 3.0] and mine.sequences == batch.sequences


def test_generation_batches_are_seeded_by_themselves_and_regathered_in_order():
    assert batch_seed(7, 0) == 7  # one batch samples as before batches had seeds of their own
    assert batch_seed(0, 1) == batch_seed(0, 1) != batch_seed(0, 2) != batch_seed(1, 1)
    counts = batch_rollout_counts(5, 2, 3)
    assert counts == [6, 6, 3]
    pieces = split_by_batch(list(range(9)), [0, 2], counts)
    assert pieces == [(0, [0, 1, 2, 3, 4, 5]), (2, [6, 7, 8])]
    with pytest.raises(ValueError):
        split_by_batch(list(range(8)), [0, 2], counts)


def test_a_failure_reported_by_any_rank_is_raised_on_every_rank():
    raise_shared_failure([("rollouts", None), ("rollouts", None)])
    with pytest.raises(UserInputError, match="rank 1: bad reward"):
        raise_shared_failure([("rollouts", None), ("failed", ("input", "bad reward"))])
    with pytest.raises(DistributedFailure, match="rank 0: MemoryError"):
        raise_shared_failure([("failed", ("internal", "MemoryError: x")), ("done", None)])
    with pytest.raises(DistributedFailure, match="out of step"):
        raise_shared_failure([("gradients pass 1", None), ("gradients pass 2", None)])


def test_count_sketches_of_shards_add_up_to_the_whole():
    from gradprobe.gradients.projection import add_count_sketch

    value = torch.randn(3, 7, 5, dtype=torch.float64)
    whole = torch.zeros(3, 64, dtype=torch.float64)
    add_count_sketch(value, "w", 4, whole)
    flat, parts = value.reshape(3, -1), torch.zeros(3, 64, dtype=torch.float64)
    for start in range(0, 35, 12):  # 3 shards of ceil(35 / 3) = 12 coordinates
        add_count_sketch(flat[:, start:start + 12], "w", 4, parts, first=start)
    torch.testing.assert_close(parts, whole)


def test_each_step_exchanges_the_sums_and_targets_any_rank_needs():
    from gradprobe.distributed.sharded import step_needs
    from gradprobe.gradients.engine import Reductions

    # 3 prompts of 2 units; prompt p of task p // 2 (sums 2t, 2t + 1 are task t's signs)
    weights = torch.zeros(4, 6)
    for unit in range(6):
        weights[2 * (unit // 4) + unit % 2, unit] = 1.0
    reductions = Reductions([[0, 1], [2, 3], [4, 5]], weights, torch.eye(4)[:2], [0, 0, 0, 0, 1, 1])
    sums, targets = step_needs([[[0], [1]], [[2], None]], reductions)
    assert sums == [[0, 1, 2, 3], [0, 1]] and targets == [[0, 1], [0]]


def _sharded_engine_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of `test_sharded_engine_in_lockstep_with_empty_steps`: FSDP2, sharded sums, one
    prompt per micro-batch; rank 0 saves what the one-process engine is compared with."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GRADPROBE_COLLECTIVE_TIMEOUT="60")
    torch.set_num_threads(1)
    from test_gradients_exact import TEMPERATURE, make_model
    from test_gradients_hooked import units_of

    from gradprobe.distributed import open_session
    from gradprobe.distributed.data_parallel import DataParallel
    from gradprobe.distributed.session import leave_process
    from gradprobe.distributed.sharded import shard_parameters, shard_rows
    from gradprobe.gradients.hooked import HookedEngine
    from gradprobe.gradients.params import select_parameters

    with open_session("cpu") as session:
        model = make_model("llama")  # tied embeddings
        names = select_parameters(model, ["all"])
        batch, layout = units_of(3)  # 3 and 4 prompts with a loss on the two ranks
        reductions = layout.reductions()
        parallel = DataParallel(session, sharded_sums=True, lockstep=True)
        local = parallel.local_batch(batch, reductions.prompts)
        shard_parameters(model, session)
        engine = HookedEngine(model, names, TEMPERATURE, accumulate_dtype=torch.float64, completion=parallel)
        result = engine.run(local, reductions, max_tokens=1)
        sums = {n: shard_rows(result.sums[n], result.sum_shards, shape)
                for n, shape in zip(result.param_names, result.param_shapes)}
        if session.is_writer:
            torch.save({"prompt_gram": result.prompt_gram, "sum_dots": result.sum_dots, "row_dots": result.row_dots,
                        "sums": sums, "empty_steps": [sum(s is None for s in plan) for plan in parallel._plans]}, out)
    leave_process(0)  # as the CLI's ranks leave: without finalizing the interpreter


def test_sharded_engine_in_lockstep_with_empty_steps(tmp_path):
    """The engine itself on 2 spawned ranks (gloo), one prompt per micro-batch so the ranks'
    step counts differ: the rank with fewer prompts runs empty steps, and the Grams, sum dots,
    row dots and the sums gathered from the shards equal one process's."""
    import socket

    import torch.multiprocessing as mp
    from test_gradients_exact import TEMPERATURE, make_model
    from test_gradients_hooked import units_of

    from gradprobe.gradients.hooked import HookedEngine
    from gradprobe.gradients.params import select_parameters

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_sharded_engine_worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    model = make_model("llama")
    batch, layout = units_of(3)  # 3 and 4 prompts with a loss on the two ranks
    want = HookedEngine(model, select_parameters(model, ["all"]), TEMPERATURE,
                        accumulate_dtype=torch.float64).run(batch, layout.reductions(), max_tokens=1)
    assert sum(got["empty_steps"]) > 0
    for key in ("prompt_gram", "sum_dots", "row_dots"):
        torch.testing.assert_close(got[key], getattr(want, key), rtol=1e-9, atol=1e-12)
    for name, value in want.sums.items():
        torch.testing.assert_close(got["sums"][name], value, rtol=1e-9, atol=1e-12)


def _failing_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 fails inside its second step of a sharded pass; writes what each rank raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GRADPROBE_COLLECTIVE_TIMEOUT="300")
    torch.set_num_threads(1)
    from test_gradients_exact import TEMPERATURE, make_model
    from test_gradients_hooked import units_of

    from gradprobe.distributed import open_session
    from gradprobe.distributed.data_parallel import DataParallel
    from gradprobe.distributed.session import leave_process
    from gradprobe.distributed.sharded import shard_parameters
    from gradprobe.gradients.hooked import HookedEngine
    from gradprobe.gradients.params import select_parameters

    raised = "nothing"
    try:
        with open_session("cpu") as session:
            model = make_model("llama")
            batch, layout = units_of(3)
            reductions = layout.reductions()
            parallel = DataParallel(session, sharded_sums=True, lockstep=True)
            local = parallel.local_batch(batch, reductions.prompts)
            shard_parameters(model, session)
            engine = HookedEngine(model, select_parameters(model, ["all"]), TEMPERATURE,
                                  accumulate_dtype=torch.float64, completion=parallel)
            if rank == 1:
                calls, forward_backward = [0], engine._forward_backward

                def failing(*args):
                    calls[0] += 1
                    if calls[0] == 2:
                        raise RuntimeError("out of memory on this device")
                    forward_backward(*args)

                engine._forward_backward = failing
            engine.run(local, reductions, max_tokens=1)
    except Exception as error:
        raised = f"{type(error).__name__}: {error}"
    Path(f"{out}.{rank}").write_text(raised)
    leave_process(0)


def test_a_rank_failing_inside_a_sharded_pass_ends_every_rank_at_once(tmp_path):
    """The others wait inside a step's collective: the failing rank leaves at once, and their
    collective fails then, well before the (here 300 s) collective timeout."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    context = mp.spawn(_failing_rank_worker, args=(2, port, str(tmp_path / "raised")), nprocs=2, join=False)
    while not context.join(timeout=120):
        pass
    assert time.monotonic() - start < 120
    assert (tmp_path / "raised.1").read_text() == "RuntimeError: out of memory on this device"
    # rank 0 waited in one of FSDP2's gathers or in a sums exchange: either is a CollectiveFailure
    other = (tmp_path / "raised.0").read_text()
    assert other.startswith("CollectiveFailure: ") and "between ranks" in other and "peer is gone" in other
