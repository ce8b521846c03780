"""The ``python_tests`` reward: run the completion's code against the task's asserts, in a sandbox.

The code is the completion's last ```python fenced block (else its last untagged block, else the
whole completion); the tests are Python statements, normally asserts, from the ``tests`` mix
column (a string, a list of strings or a JSON list of strings) or else from ``answer``. Score: 1.0
when every test statement ran without an exception, else 0.0; a crash, hang, fork bomb, memory
bomb or flood of output scores 0.0 and never raises or hangs gradprobe.

The sandbox, in layers (see `run_python_tests`):

* a separate process, ``python -I`` (no PYTHON* variables, no user site, no script dir on the
  path), in a fresh temporary directory, with an environment holding nothing of gradprobe's;
* a process group of its own (``start_new_session``), killed whole on the wall-clock timeout;
* resource limits set by the child on itself before any of the code runs (CPU seconds, address
  space, file size, open files, processes, no core dumps); stdout and stderr go to unlinked temp
  files that RLIMIT_FSIZE caps, of which gradprobe reads only a few KiB;
* a new network namespace with no interfaces (``unshare --net``) where the platform allows it;
* an audit hook, installed before the code runs, refusing sockets, process creation and
  signalling, ctypes/cffi, writes outside the temporary directory, reads outside it and the
  Python installation, and the introspection that would let code remove the hook;
* success needs a per-run nonce printed after the last test, so ``sys.exit(0)`` or
  ``os._exit(0)`` before the tests cannot pass.

CPython audit hooks are not a security boundary against code written to defeat them; they stop
accidents and the usual reward hacks. The kernel-enforced layers (limits, process group, network
namespace) are the ones to rely on, and untrusted code at scale belongs in a container or VM.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.registry import register_reward

log = logging.getLogger(__name__)

# Seconds on top of `timeout` for the interpreter to start before the wall clock kills it.
STARTUP_GRACE_S = 1.0
# The largest file, stdout and stderr included, the code may write (RLIMIT_FSIZE).
MAX_FILE_BYTES = 8 << 20
# How much of stdout and stderr gradprobe reads back.
READ_BYTES = 16 << 10
MAX_OPEN_FILES = 64
# RLIMIT_NPROC counts every process and thread of the user, not just the sandbox's, so it is a
# generous backstop; the audit hook is what refuses fork and exec (and root ignores this limit).
MAX_USER_TASKS = 512
_PYTHON_TAGS = {"python", "py", "python3"}


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did: `passed` is the verdict, the rest is for diagnosis."""

    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str


@register_reward("python_tests")
def python_tests(
    completion: str,
    answer: Any,
    tests: Any = None,
    timeout: float = 5.0,
    memory_mb: int = 512,
    network_namespace: bool = True,
    **_: Any,
) -> float:
    """1.0 when the completion's code passes all the task's tests in the sandbox, else 0.0.

    `tests` (the mix column) wins over `answer`; `timeout` is wall-clock seconds for the code
    and tests, `memory_mb` the address-space limit. Raises `UserInputError` only when the task
    has no tests.
    """
    test_code = tests_source(tests if tests is not None else answer)
    code = extract_code(completion if isinstance(completion, str) else "")
    result = run_python_tests(
        code, test_code, timeout=float(timeout), memory_mb=int(memory_mb),
        network_namespace=bool(network_namespace),
    )
    if not result.passed:
        log.debug("python_tests failed (rc=%s, timed out=%s): %s", result.returncode,
                  result.timed_out, result.stderr[-500:])
    return float(result.passed)


def tests_source(tests: Any) -> str:
    """The test statements as one source string, from a string, a list or a JSON list."""
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        try:
            tests = json.loads(tests)
        except ValueError:
            pass  # a test that starts with "[" is still Python
    if isinstance(tests, (list, tuple)):
        tests = "\n".join(str(test) for test in tests)
    # Test code without an assert is almost surely a misplaced column (a reference solution or
    # an expected output), which would pass any code that merely runs.
    if not isinstance(tests, str) or "assert" not in tests:
        raise UserInputError(
            "python_tests reward needs test code with assert statements: give a 'tests' mix "
            "column (a string or a list of strings) or put the asserts in 'answer'; got "
            f"{str(tests)[:80]!r}"
        )
    return tests


def extract_code(completion: str) -> str:
    """The last ```python block, else the last untagged ``` block, else the whole completion.

    An unclosed final fence (a completion cut off by the token limit) still counts as a block.
    """
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in completion.splitlines():
        fence = line.strip().startswith("```")
        if current is None and fence:
            current = []
            blocks.append((line.strip()[3:].strip().lower(), current))
        elif fence:
            current = None
        elif current is not None:
            current.append(line)
    for wanted in (_PYTHON_TAGS, {""}):
        chosen = [body for tag, body in blocks if tag in wanted]
        if chosen:
            return "\n".join(chosen[-1])
    return completion


def run_python_tests(
    code: str,
    tests: str,
    timeout: float = 5.0,
    memory_mb: int = 512,
    network_namespace: bool = True,
) -> SandboxResult:
    """Run `code` then `tests` in a fresh sandboxed interpreter; never raises, never hangs."""
    nonce = secrets.token_hex(16)
    try:
        with tempfile.TemporaryDirectory(
            prefix="gradprobe-sandbox-", ignore_cleanup_errors=True
        ) as workdir:
            return _run_in(os.path.realpath(workdir), code, tests, nonce, timeout, memory_mb,
                           network_namespace)
    except Exception as exc:  # noqa: BLE001  (a sandbox failure is a failed test, not a crash)
        log.warning("python_tests sandbox could not run: %s", exc)
        return SandboxResult(False, None, False, "", f"sandbox error: {exc}")


def _run_in(
    workdir: str, code: str, tests: str, nonce: str, timeout: float, memory_mb: int,
    network_namespace: bool,
) -> SandboxResult:
    for name, text in (("solution.py", code), ("tests.py", tests)):
        with open(os.path.join(workdir, name), "w", encoding="utf-8", errors="replace") as f:
            f.write(text)
    # Unlinked files: the child cannot reach them by name, RLIMIT_FSIZE caps them, and the
    # parent reads back only a bounded slice, so a flood of output costs neither side memory.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        command = _command(workdir, timeout, memory_mb, network_namespace)
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir,
            env=_child_env(workdir), start_new_session=True, close_fds=True,
        )
        timed_out = _feed_and_wait(proc, nonce, timeout + STARTUP_GRACE_S)
        stdout, stderr = _read_tail(out), _read_tail(err)
    passed = not timed_out and proc.returncode == 0 and _ends_with_nonce(stdout, nonce)
    return SandboxResult(passed, proc.returncode, timed_out, stdout, stderr)


def _command(workdir: str, timeout: float, memory_mb: int, network_namespace: bool) -> list[str]:
    if not sys.executable:
        raise RuntimeError("no Python interpreter path (sys.executable is empty)")
    cpu_seconds = math.ceil(timeout) + 1  # +1: interpreter start-up counts too
    limits = [cpu_seconds, int(memory_mb) << 20, MAX_FILE_BYTES, MAX_OPEN_FILES, MAX_USER_TASKS]
    prefix = list(_netns_prefix()) if network_namespace else []
    return [*prefix, sys.executable, "-I", "-c", _RUNNER, workdir, *map(str, limits)]


def _child_env(workdir: str) -> dict[str, str]:
    """Nothing inherited: no PATH, no tokens; HOME and TMPDIR point into the sandbox."""
    env = {"HOME": workdir, "TMPDIR": workdir}
    # One BLAS/OpenMP thread: each extra thread reserves address space against RLIMIT_AS.
    env.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
    return env


def _feed_and_wait(proc: subprocess.Popen[bytes], nonce: str, wall_s: float) -> bool:
    """Hand the child its nonce, wait up to `wall_s`; kill its whole group. True if timed out."""
    try:
        assert proc.stdin is not None
        proc.stdin.write(nonce.encode() + b"\n")
        proc.stdin.close()
    except OSError:
        pass  # the child died before reading: its exit status tells
    try:
        proc.wait(timeout=wall_s)
        return False
    except subprocess.TimeoutExpired:
        return True
    finally:
        _kill_group(proc)  # also on KeyboardInterrupt: never leave the child running


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
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


def _read_tail(file: IO[bytes]) -> str:
    """The last READ_BYTES of a capture file, decoded leniently."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - READ_BYTES))
    return file.read(READ_BYTES).decode("utf-8", errors="replace")


def _ends_with_nonce(stdout: str, nonce: str) -> bool:
    lines = stdout.rstrip("\n").rsplit("\n", 1)
    return lines[-1] == nonce


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give the child an empty network namespace, if that works here.

    Root can make one directly, others only where unprivileged user namespaces are enabled;
    tried once per process, falling back to no namespace (the audit hook still refuses sockets).
    """
    unshare = shutil.which("unshare") if sys.platform.startswith("linux") else None
    if unshare is None or not sys.executable:
        return ()
    for flags in (["--net"], ["--user", "--map-root-user", "--net"]):
        prefix = (unshare, *flags, "--")
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", "pass"], env={}, timeout=10,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    log.info("no network namespace available for python_tests; relying on the audit hook")
    return ()


# The policy the child installs as an audit hook. It is exec'd into a private namespace with a
# private copy of the builtins, holds C functions captured before any untrusted code runs, and
# refuses the introspection (gc, tracing, traceback frames of its own) that could reach it.
_POLICY = r'''
import posix, sys, _thread

_lstat, _readlink, _getcwd, _ident = posix.lstat, posix.readlink, posix.getcwd, _thread.get_ident
_OWN = globals()
try:
    raise ValueError
except ValueError as error:
    _TRACEBACK = type(error.__traceback__)
_WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC
_BUSY = set()
_DEVICES = {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"}
_REFUSED = {
    "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.chdir", "os.symlink",
    "os.link", "resource.setrlimit", "resource.prlimit",
    "sys.settrace", "sys.setprofile", "sys._current_frames", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents", "sys.addaudithook",
}
_REFUSED_PREFIXES = (
    "socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "ctypes.", "urllib.",
    "http.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
    "webbrowser.", "pty.", "signal.pthread_kill",
)
_REFUSED_MODULES = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "posix", "_posixsubprocess",
                    "_posixshmem", "_gdbm", "_dbm"}
_WRITE_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
                      "os.truncate", "os.setxattr", "os.removexattr", "shutil.rmtree",
                      "os.rename", "sqlite3.connect"}


def install(root, read_roots):
    global _ROOT, _READ_ROOTS
    _ROOT, _READ_ROOTS = root, tuple(read_roots)
    sys.addaudithook(_hook)


def _refuse(what):
    raise PermissionError("gradprobe sandbox refuses " + what)


def _resolve(path):
    """Absolute, normalised, symlink-free form of a str path, or None if it cannot be read."""
    if type(path) is bytes:
        path = path.decode("utf-8", "surrogateescape")
    if type(path) is not str or "\x00" in path:
        return None
    if not path.startswith("/"):
        path = _getcwd() + "/" + path
    parts, todo, links = [], path.split("/")[::-1], 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        here = "/" + "/".join(parts + [part])
        try:
            mode = _lstat(here).st_mode
        except OSError:
            mode = 0
        if mode & 0o170000 != 0o120000:
            parts.append(part)
            continue
        links += 1
        if links > 40:
            return None
        target = _readlink(here)
        if target.startswith("/"):
            parts = []
        todo.extend(target.split("/")[::-1])
    return "/" + "/".join(parts)


def _under(path, roots):
    for root in roots:
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return True
    return False


def _kind(path):
    """The file-type bits of a (symlink-free) path's mode; 0 if it does not exist."""
    try:
        return _lstat(path).st_mode & 0o170000
    except OSError:
        return 0


def _check_open(path, mode, flags):
    if type(path) is int:
        return  # an already-open descriptor, vetted when it was opened
    resolved = _resolve(path)
    if resolved is None:
        _refuse("an unreadable path")
    inside = _under(resolved, (_ROOT,))
    writing = (type(mode) is str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) \
        or (type(flags) is int and flags & _WRITE_FLAGS)
    if writing and not inside and resolved not in _DEVICES:
        _refuse("writing outside the sandbox: " + resolved)
    if not inside and not _under(resolved, _READ_ROOTS):
        _refuse("reading outside the sandbox: " + resolved)
    kind = _kind(resolved)
    if mode is None and not inside and kind == 0o040000:
        _refuse("a directory descriptor outside the sandbox")  # dir_fd would dodge these checks
    if kind in (0o060000, 0o020000) and resolved not in _DEVICES:
        _refuse("device files")  # root could mknod a disk device inside the sandbox


def _check_write_paths(event, args):
    paths = args[:2] if event == "os.rename" else args[:1]
    for path in paths:
        if type(path) is int and event == "os.truncate":
            continue  # truncating needs a descriptor opened for writing, vetted then
        if event == "sqlite3.connect":
            if type(path) is not str or path.startswith("file:"):
                _refuse("sqlite URIs and odd database paths")
            if path in (":memory:", ""):
                continue
        resolved = _resolve(path)  # None for descriptors: chmod(fd) would reach any open file
        if resolved is None or not _under(resolved, (_ROOT,)):
            _refuse(event + " outside the sandbox")


def _check_frame(traceback):
    """Refuse `tb_frame` when it would hand out one of this policy's own frames."""
    me = _ident()
    if me in _BUSY:
        return
    _BUSY.add(me)
    try:
        own = traceback.tb_frame.f_globals is _OWN
    finally:
        _BUSY.discard(me)
    if own:
        _refuse("access to the sandbox's frames")


def _hook(event, args):
    # Only exact str/int/bytes are touched: a method call on anything else would run the
    # caller's code inside this frame, and from there it could reach this module's globals.
    if event in _REFUSED or event.startswith(_REFUSED_PREFIXES):
        _refuse(event)
    elif event == "import":
        if type(args[0]) is str and args[0].split(".")[0] in _REFUSED_MODULES:
            raise ImportError("gradprobe sandbox refuses importing " + args[0])
    elif event == "open":
        _check_open(args[0], args[1], args[2])
    elif event in _WRITE_PATH_EVENTS:
        _check_write_paths(event, args)
    elif event == "object.__getattr__" and type(args[1]) is str and args[1] == "tb_frame":
        if type(args[0]) is _TRACEBACK:  # sys.audit() could pass a lookalike with a property
            _check_frame(args[0])
'''

# The child's main program. Set-up (limits, defusing, hook) runs before a line of the untrusted
# code; the nonce arrives on stdin and is printed only after the last test statement.
_RUNNER = r'''
import os, sys

def _limit(cpu, memory, file_size, open_files, tasks):
    try:
        import resource
    except ImportError:
        return  # no rlimits on this platform: the parent's wall clock still applies
    for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_AS", memory), ("RLIMIT_FSIZE", file_size),
                        ("RLIMIT_NOFILE", open_files), ("RLIMIT_NPROC", tasks),
                        ("RLIMIT_CORE", 0)):
        which = getattr(resource, name, None)
        if which is not None:
            try:
                resource.setrlimit(which, (value, value))  # soft = hard: no raising it again
            except (ValueError, OSError):
                pass

def _refuse(*args, **kwargs):
    raise PermissionError("gradprobe sandbox refuses this")

def _defuse():
    """Replace process creation and special files that no audit event covers."""
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = _refuse
    except ImportError:
        pass
    import posix
    for name in ("mkfifo", "mknod"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _refuse)

def _read_roots():
    places = sys.path + [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    places += ["/usr", "/lib", "/lib64", "/etc/localtime", "/dev/null", "/dev/urandom",
               "/dev/random", "/dev/zero"]
    return sorted({os.path.realpath(p) for p in places if p})

def _install(root):
    import builtins
    private = {"__builtins__": dict(builtins.__dict__), "__name__": "gradprobe_policy"}
    exec(compile(POLICY, "gradprobe_policy", "exec"), private)
    private["install"](root, _read_roots())

def _main():
    root = sys.argv[1]
    limits = [int(value) for value in sys.argv[2:7]]
    nonce = sys.stdin.buffer.readline().strip()
    with open("solution.py", encoding="utf-8") as f:
        code = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = f.read()
    write, exit_ = os.write, os._exit
    sys.dont_write_bytecode = True
    _limit(*limits)
    _defuse()
    _install(root)
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
        exec(compile(tests, "tests.py", "exec"), namespace)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as exc:
        try:
            sys.stderr.write(("%s: %s\n" % (type(exc).__name__, exc))[:4000])
            sys.stderr.flush()
        except BaseException:
            pass
        exit_(1)
    write(1, b"\n" + nonce + b"\n")
    exit_(0)

_main()
'''
_RUNNER = f"POLICY = {_POLICY!r}\n" + _RUNNER
