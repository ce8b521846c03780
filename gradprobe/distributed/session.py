"""One process's place in a torchrun job: process group, rank, world, and the collectives the scan uses.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `open_session` joins the group
(nccl on CUDA, gloo on the CPU) with a collective timeout, so a peer that stops answering ends
the job instead of hanging it. Without torchrun's variables it is a session of one process whose
collectives are identities, and the scan runs as before.

Failures are shared, not raced: every exchange starts with `agree`, where each rank says "ok" or
why it failed. A rank that fails calls `agree` once with its error before it exits; that call
meets the other ranks at whatever exchange they wait in, and all of them raise the same error.
The collectives that move data only run after every rank said "ok".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn

import torch

from gradprobe.errors import UserInputError

DEFAULT_TIMEOUT_S = 3600.0
"""How long a collective waits for every rank: it must cover the longest stretch of local work
between two exchanges (a slow rank's whole pass over its prompts)."""
TIMEOUT_VARIABLE = "GRADPROBE_COLLECTIVE_TIMEOUT"


class DistributedFailure(RuntimeError):
    """Another rank failed with something other than a user error, or the ranks fell out of step."""


class CollectiveFailure(DistributedFailure):
    """A collective itself failed: a peer is gone or did not answer within the timeout. No rank
    can be told any more; torchrun ends the others."""


@contextmanager
def _collective(kind: str) -> Iterator[None]:
    """A collective's own failure (torch raises RuntimeError subclasses) as CollectiveFailure."""
    try:
        yield
    except RuntimeError as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise CollectiveFailure(f"the {kind} exchange between ranks failed (a peer is gone or timed out "
                                f"after {collective_timeout().total_seconds():.0f} s): {first_line}") from None


@dataclass
class CommunicationLog:
    """Payload bytes handed to each kind of collective (what this rank sends into it), and the
    bytes each rank sends on the wire by the ring algorithms: all-reduce 2 (N - 1) / N x payload,
    reduce-scatter (N - 1) / N x its input, all-gather (N - 1) x its input (its shard)."""

    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    calls_by_kind: dict[str, int] = field(default_factory=dict)
    wire_by_kind: dict[str, float] = field(default_factory=dict)

    def add(self, kind: str, n_bytes: int, wire: float = 0.0) -> None:
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + n_bytes
        self.calls_by_kind[kind] = self.calls_by_kind.get(kind, 0) + 1
        self.wire_by_kind[kind] = self.wire_by_kind.get(kind, 0.0) + wire

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    @property
    def wire_bytes(self) -> float:
        return sum(self.wire_by_kind.values())


@dataclass
class Session:
    """This process's rank in a world of `world` processes (world 1: no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    log: CommunicationLog = field(default_factory=CommunicationLog)
    in_lockstep: bool = False
    """Inside a pass whose ranks exchange within every step (sharded sums, FSDP2): a failure
    there cannot be reported at an `agree`, the others wait in another collective."""

    @property
    def is_distributed(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes artifacts and prints results."""
        return self.rank == 0

    def agree(self, phase: str, error: BaseException | None = None) -> None:
        """Every rank reports `phase` and its error (None: ok); raises on every rank when any
        failed (UserInputError for a user error, else DistributedFailure), or when the ranks
        that are ok are at different phases."""
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        reports: list[Any] = [None] * self.world
        mine = (phase, None if error is None else _describe(error))
        with _collective(phase):
            torch.distributed.all_gather_object(reports, mine)
        self.log.add("agree", 0)
        raise_shared_failure(reports)

    def all_reduce_sum(self, tensor: torch.Tensor, kind: str) -> None:
        """tensor <- the sum of every rank's tensor, in place (CPU tensors go through the
        current CUDA device under nccl)."""
        if not self.is_distributed:
            return
        n_bytes = tensor.numel() * tensor.element_size()
        self.log.add(kind, n_bytes, 2 * (self.world - 1) / self.world * n_bytes)
        with _collective(kind):
            staged = self._staged(tensor)
            torch.distributed.all_reduce(staged)
            if staged is not tensor:
                tensor.copy_(staged)

    def reduce_scatter(self, output: torch.Tensor, chunks: torch.Tensor, kind: str) -> None:
        """output <- sum over ranks of their chunks[rank] (chunks: [world, *output.shape],
        contiguous): the ring sends (N - 1) / N of the chunks."""
        n_bytes = chunks.numel() * chunks.element_size()
        self.log.add(kind, n_bytes, (self.world - 1) / self.world * n_bytes)
        with _collective(kind):
            staged_out, staged_in = self._staged(output), self._staged(chunks)
            reduce_scatter = getattr(torch.distributed, "reduce_scatter_single", None) or \
                torch.distributed.reduce_scatter_tensor  # the older name
            reduce_scatter(staged_out, staged_in.reshape(-1, *output.shape[1:]))
            if staged_out is not output:
                output.copy_(staged_out)

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, kind: str) -> None:
        """output [world, *shard.shape] <- every rank's shard, in rank order."""
        n_bytes = shard.numel() * shard.element_size()
        self.log.add(kind, n_bytes, (self.world - 1) * n_bytes)
        with _collective(kind):
            staged_out, staged_in = self._staged(output), self._staged(shard.contiguous())
            gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
            gather(staged_out.reshape(-1, *shard.shape[1:]), staged_in)
            if staged_out is not output:
                output.copy_(staged_out)

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor, or under nccl a CPU tensor's copy on the current CUDA device."""
        if self.backend == "nccl" and tensor.device.type != "cuda":
            return tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return tensor

    def all_gather_objects(self, value: Any, kind: str) -> list[Any]:
        """Every rank's `value`, in rank order (pickled; for small data such as rollouts)."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world
        with _collective(kind):
            torch.distributed.all_gather_object(gathered, value)
        self.log.add(kind, len(_pickled(value)))
        return gathered


def peer_failure(error: BaseException) -> CollectiveFailure | None:
    """A backend's error raised outside `Session`'s collectives (FSDP2's gathers inside a step)
    because a peer is gone or timed out, as CollectiveFailure; None for any other error."""
    text = str(error)
    backend = isinstance(error, getattr(torch.distributed, "DistError", ())) or (
        isinstance(error, RuntimeError) and ("gloo" in text or "NCCL" in text))
    if not backend:
        return None
    first_line = (text.splitlines() or [""])[0]
    return CollectiveFailure(f"an exchange between ranks inside a gradient pass failed (a peer is gone or "
                             f"timed out after {collective_timeout().total_seconds():.0f} s): {first_line[:300]}")


def raise_shared_failure(reports: list[tuple[str, tuple[str, str] | None]]) -> None:
    """Raise the first failure among the ranks' (phase, failure) reports, naming its rank; or
    DistributedFailure when the ranks that are ok report different phases."""
    for rank, (_, failure) in enumerate(reports):
        if failure is not None:
            kind, message = failure
            text = f"rank {rank}: {message}"
            error = UserInputError(text) if kind == "input" else DistributedFailure(text)
            error.shared = True  # every rank raises it: none reports it again
            raise error
    phases = {phase for phase, _ in reports}
    if len(phases) > 1:
        raise DistributedFailure(f"ranks out of step: {', '.join(f'rank {r} at {p}' for r, (p, _) in enumerate(reports))}")


def _describe(error: BaseException) -> tuple[str, str]:
    if isinstance(error, UserInputError):
        return "input", str(error)
    first_line = (str(error).splitlines() or [""])[0]
    return "internal", f"{type(error).__name__}: {first_line}"


def _pickled(value: Any) -> bytes:
    import pickle

    return pickle.dumps(value)


_current = Session()


def current() -> Session:
    """The session of this process (a one-process session unless `open_session` is active)."""
    return _current


def collective_timeout() -> timedelta:
    """GRADPROBE_COLLECTIVE_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserInputError(f"{TIMEOUT_VARIABLE}={text!r}: give a number of seconds") from None
    if not seconds > 0:
        raise UserInputError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def leave_process(code: int) -> NoReturn:
    """End this rank now with `code`, output flushed, without the interpreter's finalization.

    Why: a rank that leaves normally finalizes the interpreter while C++ threads (gloo's workers,
    the autograd engine's) may still release objects that hold Python references; doing so while
    the interpreter is torn down aborts the process ("terminate called without an active
    exception", pytorch/pytorch#190489), which torchrun then reports as a failed rank after a
    scan that succeeded. Everything the scan owns is closed by then: its files are written and
    renamed, its process group destroyed, its workers stopped (each in a `finally`)."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


@contextmanager
def open_session(device: str = "auto", report: Callable[[BaseException], None] | None = None) -> Iterator[Session]:
    """Join torchrun's process group for the block (nccl when CUDA is used, else gloo), make it
    `current()`, and leave it after; without torchrun, a one-process session and nothing else.

    On an error inside the block this rank reports it to the others (`Session.agree`) before it
    propagates, so no rank waits for one that is gone; rank 0 hands the error, its own or
    another's, to `report` (the one message the user sees), and every rank waits for the others
    before leaving, so none is ended by torchrun before that message is out. When a collective
    itself failed (a peer gone or timed out) no one can be told: each rank that saw it reports
    it and leaves. On success every rank agrees once more at the end, so all exit alike."""
    global _current
    if not launched_by_torchrun():
        yield _current
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    torch.distributed.init_process_group(backend, timeout=collective_timeout(),
                                         device_id=torch.device("cuda", local_rank) if use_cuda else None)
    session = _current = Session(rank, world, local_rank, backend)
    try:
        try:
            yield session
            session.agree("done")
        except BaseException as error:
            shared = getattr(error, "shared", False)
            if session.in_lockstep and not shared and not isinstance(error, CollectiveFailure):
                # The others wait inside a step's collective, which no report can meet: say it
                # here and leave; their collective then fails at once (this process is gone).
                failure = peer_failure(error)
                if report is not None:
                    report(failure or error)
                if failure is not None:
                    raise failure from None
                raise
            if not shared and not isinstance(error, CollectiveFailure):
                shared = _tell_others(session, error)
            if report is not None and (session.is_writer or isinstance(error, CollectiveFailure)):
                report(error)
            if shared:
                _wait_for_all(session)
            raise
    finally:
        _current = Session()
        torch.distributed.destroy_process_group()


@contextmanager
def joined_session() -> Iterator[Session]:
    """The process group a trainer already started (accelerate, torchrun in the user's script) as
    `current()` for the block, so `gradprobe.measure` shares its prompts over the ranks; the group
    stays open afterwards, as it is not ours. Without a group of more than one process, the
    one-process session. Failures are not shared here: the caller agrees with the others."""
    global _current
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        yield _current
        return
    previous = _current
    _current = Session(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", "0")), torch.distributed.get_backend())
    try:
        yield _current
    finally:
        _current = previous


def _tell_others(session: Session, error: BaseException) -> bool:
    """Report `error` at the others' next exchange; False when that failed (a peer is gone or
    timed out: torchrun ends the rest)."""
    try:
        session.agree("failed", error)
    except CollectiveFailure:
        return False
    except (UserInputError, DistributedFailure):
        return True  # the report itself (or another rank's, made at the same time)
    return True


def _wait_for_all(session: Session) -> None:
    """A last barrier (bounded on gloo), so every rank leaves after rank 0 reported."""
    try:
        if session.backend == "gloo":
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            torch.distributed.barrier()
    except RuntimeError:
        pass
