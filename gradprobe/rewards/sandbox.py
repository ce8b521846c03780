"""Running untrusted programs: an OS-level jail (bubblewrap) or, only when asked, a weaker guard.

``bwrap`` isolation (the default) runs the program with:

* new PID, network (no interfaces), IPC and UTS namespaces, and a new user namespace with the
  program as uid/gid 65534 (nobody); when gradprobe runs as root, bubblewrap sets the jail up
  with root's privileges and ``setpriv`` then drops to the real uid 65534 with no capabilities,
  so the kernel's per-user process limit applies to it;
* a minimal read-only root (the system's ``/usr`` and the Python installation), private empty
  ``/tmp`` (the working directory), ``/dev`` and ``/proc``; none of the user's files;
* ``--die-with-parent`` and a process group (and session, so no terminal) of its own: it dies
  with gradprobe and is killed whole (the PID namespace with it) on the wall-clock timeout;
* resource limits the program sets on itself before any untrusted code runs (`Limits`).

``weak`` isolation (``--allow-weak-sandbox``) is for machines without user namespaces: a plain
child process in a temporary directory with the same limits, where the in-process audit hook
of `gradprobe.rewards.python_tests` is the only guard against reads, writes and escapes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import IO

from gradprobe.errors import UserInputError

ISOLATIONS = ("bwrap", "weak")
# The uid and gid the untrusted program runs as.
NOBODY = 65534
# Seconds on top of the program's timeout for the interpreter and the jail to start.
STARTUP_GRACE_S = 1.0


@dataclass(frozen=True)
class Limits:
    """The rlimits the program puts on itself: CPU seconds, bytes of address space and of any
    file written (stdout included), open files, and processes of its uid."""

    cpu_s: int
    memory_bytes: int
    file_bytes: int = 8 << 20
    open_files: int = 64
    processes: int = 512

    def as_args(self) -> list[str]:
        return [str(v) for v in (self.cpu_s, self.memory_bytes, self.file_bytes,
                                 self.open_files, self.processes)]


@dataclass(frozen=True)
class Finished:
    """What the program did: exit status (None when killed on time-out) and bounded output."""

    returncode: int | None
    timed_out: bool
    stdout: bytes
    stderr: bytes


def check_isolation(isolation: str) -> str:
    """`isolation` when it can run here; `UserInputError` with the reason otherwise."""
    if isolation not in ISOLATIONS:
        raise UserInputError(f"sandbox isolation {isolation!r}: choose {' or '.join(ISOLATIONS)}")
    if isolation == "bwrap":
        problem = bwrap_problem()
        if problem is not None:
            raise UserInputError(
                f"python_tests runs model-written code only inside bubblewrap, which cannot run "
                f"here ({problem}); install it (apt-get install bubblewrap) on a kernel with user "
                "namespaces, or pass --allow-weak-sandbox to accept an in-process guard that "
                "determined code can escape"
            )
    return isolation


@lru_cache(maxsize=1)
def bwrap_problem() -> str | None:
    """Why a bwrap jail cannot start here, or None when it can (tried once per process)."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux, this is {sys.platform}"
    if shutil.which("bwrap") is None:
        return "no bwrap program on PATH"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "running as root needs setpriv (util-linux) to drop to uid 65534"
    try:
        probe = subprocess.run(
            jail_command([python_executable(), "-I", "-S", "-c", "pass"]), env={}, timeout=20,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if probe.returncode != 0:
        lines = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {probe.returncode}"
    return None


def python_executable() -> str:
    """The real interpreter behind sys.executable (a virtual environment's is a symlink)."""
    if not sys.executable:
        raise RuntimeError("no Python interpreter path (sys.executable is empty)")
    return os.path.realpath(sys.executable)


def jail_command(program: Sequence[str]) -> list[str]:
    """The bwrap command line that runs `program` (its first item an absolute path) jailed."""
    bwrap = shutil.which("bwrap") or "bwrap"
    command = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent",
               "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{name}"):
            command += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
        elif os.path.isdir(f"/{name}"):
            command += ["--ro-bind", f"/{name}", f"/{name}"]
    command += _bind_outside_usr(sys.base_prefix)
    command += ["--perms", "01777", "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp"]
    if os.geteuid() == 0:
        # A user namespace would map uid 65534 to root, which ignores RLIMIT_NPROC: drop to the
        # real nobody instead, with no capabilities and no way to gain privileges.
        return [*command, "--", shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}",
                f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                "--no-new-privs", "--", *program]
    return [*command, "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--cap-drop", "ALL", "--", *program]


def _bind_outside_usr(prefix: str) -> list[str]:
    """Read-only bind of a Python installation outside /usr, its parents made traversable."""
    prefix = os.path.realpath(prefix)
    if prefix == "/usr" or prefix.startswith("/usr/"):
        return []
    parents, parent = [], os.path.dirname(prefix)
    while parent not in ("/", ""):
        parents.insert(0, parent)
        parent = os.path.dirname(parent)
    # bwrap copies a parent's mode (/root is 0700); nobody must be able to walk through.
    made = [arg for p in parents for arg in ("--perms", "0755", "--dir", p)]
    return [*made, "--ro-bind", prefix, prefix]


def run_untrusted(
    program: Sequence[str], stdin: bytes, isolation: str, timeout_s: float, read_bytes: int,
) -> Finished:
    """Run `program` under `isolation`, feed it `stdin`, wait at most `timeout_s` plus start-up.

    Whatever happens (time-out, Ctrl-C, an exception here) the program's whole process group is
    killed before this returns. stdout and stderr go to unlinked files, of which at most
    `read_bytes` each (stdout's head, stderr's tail) are read back.
    """
    if isolation == "bwrap":
        return _run(jail_command(program), stdin, "/", timeout_s, read_bytes)
    with tempfile.TemporaryDirectory(prefix="gradprobe-sandbox-", ignore_cleanup_errors=True) as workdir:
        return _run(list(program), stdin, os.path.realpath(workdir), timeout_s, read_bytes)


def _run(command: list[str], stdin: bytes, cwd: str, timeout_s: float, read_bytes: int) -> Finished:
    env = {"HOME": cwd, "TMPDIR": "/tmp" if cwd == "/" else cwd, "LANG": "C.UTF-8"}
    # One BLAS/OpenMP thread: each extra thread reserves address space against RLIMIT_AS.
    env.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd,
                                env=env, start_new_session=True, close_fds=True)
        try:
            timed_out = _feed_and_wait(proc, stdin, timeout_s + STARTUP_GRACE_S)
        finally:
            kill_group(proc)  # also on KeyboardInterrupt or SIGTERM: never leave it running
        return Finished(None if timed_out else proc.returncode, timed_out,
                        _read(out, read_bytes, head=True), _read(err, read_bytes, head=False))


def _feed_and_wait(proc: subprocess.Popen[bytes], stdin: bytes, wall_s: float) -> bool:
    """Hand the child its input and wait up to `wall_s`; True if it ran out of time.

    stdin stays open while the child runs: a program that watches it for end-of-file (as the
    python_tests harness does) learns that gradprobe is gone even if gradprobe was SIGKILLed.
    """
    assert proc.stdin is not None
    try:
        proc.stdin.write(stdin)
        proc.stdin.flush()
    except OSError:
        pass  # it died before reading all of it: its exit status tells
    try:
        proc.wait(timeout=wall_s)
        return False
    except subprocess.TimeoutExpired:
        return True
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (anything it left behind too), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        pass  # group already gone, or no process groups on this platform
    try:
        proc.kill()
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _read(file: IO[bytes], limit: int, head: bool) -> bytes:
    size = file.seek(0, os.SEEK_END)
    file.seek(0 if head else max(0, size - limit))
    return file.read(limit)
