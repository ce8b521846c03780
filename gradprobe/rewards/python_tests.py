"""The ``python_tests`` reward: the completion's code against the task's asserts, in a jail.

The code is the completion's last ```python fenced block (else its last untagged block, else the
whole completion); the tests are Python statements, normally asserts, from the ``tests`` mix
column (a string, a list of strings or a JSON list of strings) or else from ``answer``. Score: 1.0
when the code ran and every assert holds, else 0.0; a crash, hang, fork bomb, memory bomb or
flood of output scores 0.0 and never raises or hangs gradprobe.

Who decides (`gradprobe.rewards.assertions`): gradprobe splits the asserts into the expressions
that need the candidate (``add(2, 3)``), which the jailed program evaluates and sends back as
plain JSON values, and everything else (``== 5``, ``not``, ``len``, ...), which gradprobe
evaluates itself. Expected values never enter the jail and nothing the code does inside it
(replacing builtins, reading frames, ``os._exit``, printing) can make a check pass.

Where it runs (`gradprobe.rewards.sandbox`): bubblewrap (namespaces, uid nobody, a read-only
minimal root, no network) with rlimits and a wall-clock timeout; inside, an audit hook refuses
sockets, process creation, ctypes and writes outside the working directory as a second layer.
Only with ``isolation="weak"`` (``--allow-weak-sandbox``) does the code run without the jail,
and then the audit hook, which determined code can escape, is all that guards the machine.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.rewards.assertions import TestPlan, decode_value, evaluate, plan_tests
from gradprobe.rewards.registry import register_reward
from gradprobe.rewards.sandbox import Limits, check_isolation, python_executable, run_untrusted

log = logging.getLogger(__name__)

# How much of the program's answers (stdout) and diagnostics (stderr) gradprobe reads back.
ANSWER_BYTES = 1 << 20
STDERR_BYTES = 16 << 10
_PYTHON_TAGS = {"python", "py", "python3"}


@dataclass(frozen=True)
class SandboxResult:
    """What one jailed run did: `passed` is the verdict, `reason` says why it failed."""

    passed: bool
    reason: str
    returncode: int | None
    timed_out: bool
    stderr: str


@register_reward("python_tests", runs_code=True)
def python_tests(
    completion: str,
    answer: Any,
    tests: Any = None,
    timeout: float = 5.0,
    memory_mb: int = 512,
    isolation: str = "bwrap",
    **_: Any,
) -> float:
    """1.0 when the completion's code passes all the task's tests in the sandbox, else 0.0.

    `tests` (the mix column) wins over `answer`; `timeout` is wall-clock seconds for the code
    and tests, `memory_mb` the address-space limit, `isolation` ``bwrap`` or ``weak``. Raises
    `UserInputError` when the task has no usable tests or the isolation cannot run here.
    """
    test_code = tests_source(tests if tests is not None else answer)
    code = extract_code(completion if isinstance(completion, str) else "")
    result = run_python_tests(code, test_code, timeout=float(timeout), memory_mb=int(memory_mb),
                              isolation=isolation)
    if not result.passed:
        log.debug("python_tests failed (%s); stderr: %s", result.reason, result.stderr[-500:])
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
    code: str, tests: str, timeout: float = 5.0, memory_mb: int = 512, isolation: str = "bwrap",
) -> SandboxResult:
    """Run `code` and the probes of `tests` jailed, then decide the asserts outside.

    Raises `UserInputError` only for unusable tests or an isolation that cannot run here; any
    failure of the code itself is a failed result.
    """
    plan = plan_tests(tests)
    check_isolation(isolation)
    limits = Limits(cpu_s=math.ceil(timeout) + 1, memory_bytes=int(memory_mb) << 20)
    request = {"code": code, "steps": [[s.kind, s.source] for s in plan.steps],
               "limits": [int(v) for v in limits.as_args()], "weak": isolation == "weak"}
    program = [python_executable(), "-I", "-S", "-c", _RUNNER]
    finished = run_untrusted(program, json.dumps(request).encode("utf-8", "surrogatepass") + b"\n",
                             isolation, timeout, ANSWER_BYTES)
    stderr = finished.stderr[-STDERR_BYTES:].decode("utf-8", "replace")
    if finished.timed_out:
        return SandboxResult(False, f"timed out after {timeout:g}s", None, True, stderr)
    passed, reason = verdict(plan, finished.stdout)
    return SandboxResult(passed, reason, finished.returncode, False, stderr)


def verdict(plan: TestPlan, answers: bytes) -> tuple[bool, str]:
    """Whether every check of `plan` holds, given the jailed program's answer lines.

    Each line is ``{"code": "ok"}``, ``{"code": ERROR}``, ``{"i": STEP, "value": V}`` or
    ``{"i": STEP, "error": E}``; the first answer per step counts. Anything malformed or
    missing fails.
    """
    lines = answers.decode("utf-8", "replace").splitlines()
    records = [_record(line) for line in lines]
    if not records or records[0].get("code") != "ok":
        error = records[0].get("code") if records else None
        return False, f"the code did not run: {error or 'no answer'}"
    results: dict[int, dict[str, Any]] = {}
    for record in records[1:]:
        step = record.get("i")
        if type(step) is int and 0 <= step < len(plan.steps) and step not in results:
            results[step] = record
    probes: dict[int, Any] = {}
    for index, step in enumerate(plan.steps):
        result = results.get(index, {"error": "no answer"})
        if "error" in result or "value" not in result:
            if step.kind == "exec":
                return False, f"test statement {step.source!r} failed: {result.get('error')}"
            continue  # a probe that raised fails the checks that need it
        try:
            probes[index] = decode_value(result["value"]) if step.kind == "eval" else None
        except (ValueError, TypeError, RecursionError) as exc:
            return False, f"{step.source!r} sent back a bad value ({exc})"
    for check in plan.checks:
        try:
            holds = bool(evaluate(check.expression, probes))
        except Exception as exc:  # noqa: BLE001  (any failure of the check is a failed test)
            return False, f"assert {check.source} raised {type(exc).__name__}"
        if not holds:
            return False, f"assert {check.source} does not hold"
    return True, "passed"


def _record(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


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
                    "_posixshmem", "_gdbm", "_dbm", "_xxsubinterpreters", "_interpreters",
                    "_xxinterpchannels", "_interpchannels", "_testcapi", "_testinternalcapi"}
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

# The jailed program. Set-up (limits, defusing, hook) runs before a line of the untrusted code;
# its answers go to the original stdout, the code's own prints to stderr.
_RUNNER = r"""
import os, sys

def _limit(cpu, memory, file_size, open_files, tasks):
    import resource
    for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_AS", memory), ("RLIMIT_FSIZE", file_size),
                        ("RLIMIT_NOFILE", open_files), ("RLIMIT_NPROC", tasks),
                        ("RLIMIT_CORE", 0)):
        which = getattr(resource, name, None)
        if which is not None:
            try:
                resource.setrlimit(which, (value, value))  # soft = hard: no raising it again
            except (ValueError, OSError):
                pass

def _die_with_parent():
    # Outside bwrap nothing else kills this process when gradprobe is killed.
    import ctypes
    parent = os.getppid()
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:
        os._exit(1)
    for name in ("ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)  # importing it again meets the audit hook

def _refuse(*args, **kwargs):
    raise PermissionError("gradprobe sandbox refuses this")

def _defuse():
    # Process creation and special files that no audit event covers.
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

def _encode(value, depth=0):
    # Exact built-in types only: a subclass could carry a forged __eq__ out.
    kind = type(value)
    if depth > 100:
        raise ValueError("value nested too deeply")
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if value - value == 0 else {"float": repr(value)}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind in (list, tuple, set, frozenset):
        return {kind.__name__: [_encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]}
    raise TypeError("a %s cannot be compared outside the sandbox" % kind.__name__)

def _exit_with_gradprobe():
    # gradprobe keeps stdin open while it waits: end-of-file means it is gone (even SIGKILLed).
    import _thread
    def watch():
        try:
            while os.read(0, 4096):
                pass
        finally:
            os._exit(3)
    _thread.start_new_thread(watch, ())

def _main():
    import json
    request = json.loads(sys.stdin.buffer.readline().decode("utf-8", "surrogatepass"))
    _exit_with_gradprobe()
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace")
    os.dup2(2, 1)
    exit_ = os._exit
    sys.dont_write_bytecode = True
    if request["weak"]:
        _die_with_parent()
    _limit(*request["limits"])
    _defuse()
    _install(os.getcwd())

    def answer(record):
        try:
            line = json.dumps(record)
        except (ValueError, TypeError) as exc:
            line = json.dumps({"i": record.get("i"), "error": "%s: %s" % (type(exc).__name__, exc)})
        answers.write(line + "\n")
        answers.flush()

    def failure(exc):
        return ("%s: %s" % (type(exc).__name__, exc))[:500]

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(request["code"], "solution.py", "exec"), namespace)
    except BaseException as exc:
        answer({"code": failure(exc)})
        exit_(1)
    answer({"code": "ok"})
    for index, (kind, source) in enumerate(request["steps"]):
        try:
            if kind == "exec":
                exec(compile(source, "tests.py", "exec"), namespace)
                answer({"i": index, "value": None})
            else:
                value = eval(compile(source, "tests.py", "eval"), namespace)
                answer({"i": index, "value": _encode(value)})
        except BaseException as exc:
            answer({"i": index, "error": failure(exc)})
            if kind == "exec":
                break
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_(0)

_main()
"""
_RUNNER = f"POLICY = {_POLICY!r}\n" + _RUNNER
