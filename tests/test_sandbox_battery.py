"""Hostile candidates against python_tests: every one scores 0, leaves nothing, harms nothing.

The battery grows with every hole found. Escapes are written so that the candidate's `add` is
right only if the escape worked: a score of 1 means a hole. Attacks from inside the audit hook's
reach go through a subinterpreter (which has no hook) or ctypes, to test the jail itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gradprobe.errors import UserInputError
from gradprobe.rewards import sandbox
from gradprobe.rewards.assertions import plan_tests
from gradprobe.rewards.python_tests import python_tests, run_python_tests

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(10, 5) > 14"
FAST = {"timeout": 1.5, "memory_mb": 256}


@pytest.fixture(scope="module", autouse=True)
def _bwrap_runs_here() -> None:
    problem = sandbox.bwrap_problem()
    assert problem is None, f"bubblewrap cannot run here ({problem}); apt-get install bubblewrap"


def score(code: str, tests: str = TESTS, **options) -> float:
    return python_tests(f"```python\n{code}\n```", None, tests=tests, **{**FAST, **options})


def live_sandboxes(wait_s: float = 3.0) -> list[int]:
    """Processes still running the jailed program (its command line holds the policy), after
    giving killed ones `wait_s` to finish dying."""
    deadline = time.monotonic() + wait_s
    while (found := _sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def _sandbox_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"gradprobe sandbox refuses" in (entry / "cmdline").read_bytes():
                    if (entry / "stat").read_text().split(") ")[1][0] != "Z":
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def leftovers() -> list[str]:
    return sorted(p.name for p in Path(tempfile.gettempdir()).glob("gradprobe-sandbox-*"))


def in_subinterpreter(source: str) -> str:
    """Candidate code that runs `source` in a subinterpreter, where no audit hook is installed."""
    return ("import _xxsubinterpreters as interpreters\n"
            f"interpreters.run_string(interpreters.create(), {source!r})\n")


def right_if(condition: str) -> str:
    return f"def add(a, b):\n    return a + b if ({condition}) else None\n"


def escapes(target: Path, host_pid: int, port: int) -> dict[str, str]:
    """Escape attempts: name -> code whose `add` is right only if the attempt succeeded."""
    write = f"open({str(target)!r}, 'w').write('pwned')"
    return {
        "write outside": f"try:\n    {write}\nexcept OSError:\n    pass\n"
                         + right_if(f"__import__('os').path.exists({str(target)!r})"),
        "subinterpreter write": f"try:\n    {in_subinterpreter(write)}except Exception:\n    pass\n"
                                + right_if(f"__import__('os').path.exists({str(target)!r})"),
        "subinterpreter ctypes system": in_subinterpreter(
            f"import ctypes; ctypes.CDLL(None).system(b'touch {target}')") + right_if("True"),
        "subinterpreter kill gradprobe": in_subinterpreter(
            f"import os, signal; os.kill({host_pid}, signal.SIGTERM)") + right_if("True"),
        "subinterpreter kill everything": in_subinterpreter(
            "import os, signal; os.kill(-1, signal.SIGKILL)") + right_if("True"),
        "subinterpreter network": in_subinterpreter(
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)")
        + right_if("True"),
        "subinterpreter reads host secrets": in_subinterpreter(
            f"assert b'hunter2' in open('/proc/{host_pid}/environ', 'rb').read()")
        + right_if("True"),
        "subinterpreter reads the user's files": in_subinterpreter(
            f"open({__file__!r}).read()") + right_if("True"),
        "subinterpreter fork": in_subinterpreter(
            f"import os\nif os.fork() == 0:\n    {write}\n    os._exit(0)\nos.wait()")
        + right_if(f"__import__('os').path.exists({str(target)!r})"),
        "ctypes": "import ctypes\n" + right_if("True"),
        "proc of the parent": right_if("b'hunter2' in open('/proc/%d/environ' % "
                                       "__import__('os').getppid(), 'rb').read()"),
    }


FORGERIES = {
    "exit before the tests": "import sys\nsys.exit(0)",
    "os._exit before the tests": "import os\nos._exit(0)",
    "os._exit inside a probe": "import os\ndef add(a, b):\n    os._exit(0)",
    "always-equal object": "class Equal:\n    def __eq__(self, other):\n        return True\n"
                           "    __gt__ = __lt__ = __ge__ = __le__ = __eq__\n"
                           "def add(a, b):\n    return Equal()",
    "int subclass equal to all": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                                 "    __gt__ = __eq__\n    __hash__ = int.__hash__\n"
                                 "def add(a, b):\n    return Int(0)",
    "replaced builtins": "import builtins\nbuiltins.eval = lambda *a, **k: 5\n"
                         "builtins.exec = lambda *a, **k: None\nbuiltins.AssertionError = Exception",
    "caller's frame": "import sys, os\nharness = sys._getframe(1).f_locals\n"
                      "if 'nonce' in harness:  # the old in-process verdict: print its secret\n"
                      "    os.write(1, b'\\n' + harness['nonce'] + b'\\n')\n    os._exit(0)\n"
                      "harness['answer']({'code': 'ok'})\nfor i in range(9):\n"
                      "    harness['answer']({'i': i, 'value': 5})\nos._exit(0)",
    "gc": "import gc\nfor obj in gc.get_objects():\n    pass\ndef add(a, b):\n    return 5",
    "atexit": "import atexit, os\natexit.register(lambda: os.write(1, b'passed'))\n"
              "def add(a, b):\n    return 0",
    "forged answer lines": "import os, json\nfor fd in range(1, 12):\n    try:\n"
                           "        os.write(fd, b'{\"code\": \"ok\"}\\n' + b''.join(json.dumps("
                           "{'i': i, 'value': 5}).encode() + b'\\n' for i in range(9)))\n"
                           "    except OSError:\n        pass\nos._exit(0)",
    "thread answering later": "import threading, os, time\n"
                              "def forge():\n    time.sleep(0.05)\n    os.write(3, b'{\"i\": 1, \"value\": 0}\\n')\n"
                              "threading.Thread(target=forge, daemon=True).start()\n"
                              "def add(a, b):\n    time.sleep(0.1)\n    return 5",
    "signal handler": "import signal, os\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                      "signal.setitimer(signal.ITIMER_REAL, 0.01)\ndef add(a, b):\n    while True: pass",
    "huge output": "print('x' * 50_000_000)\ndef add(a, b):\n    return None",
    "memory bomb": "x = bytearray(8 * 1024 ** 3)\ndef add(a, b):\n    return a + b",
    "fork bomb": in_subinterpreter("import os\nwhile True:\n    os.fork()") + right_if("True"),
    "sleeper ignoring signals": "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                "time.sleep(60)\ndef add(a, b):\n    return a + b",
    "daemon child": in_subinterpreter(
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)")
    + "def add(a, b):\n    return None",
}


def test_escapes_fail_and_leave_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GRADPROBE_TEST_SECRET", "hunter2")
    target = tmp_path / "escaped.txt"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        attempts = escapes(target, os.getpid(), server.getsockname()[1])
        before = leftovers()
        for name, code in attempts.items():
            assert score(code) == 0.0, name
            assert not target.exists(), name
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    assert live_sandboxes() == [] and leftovers() == before
    # The battery is not simply failing everything.
    assert score(right_if("True")) == 1.0
    assert score("import threading\nlock = threading.Lock()\n" + right_if("not lock.locked()")) == 1.0
    assert score("print('x' * 1000)\n" + right_if("True")) == 1.0


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_verdicts_and_bombs_score_zero(name: str) -> None:
    before = leftovers()
    start = time.monotonic()
    assert score(FORGERIES[name]) == 0.0
    assert time.monotonic() - start < FAST["timeout"] + sandbox.STARTUP_GRACE_S + 3
    assert live_sandboxes() == [] and leftovers() == before


def jail_attacks(target: Path, host_pid: int, port: int) -> dict[str, str]:
    """Attacks run in the jail with no audit hook at all: the OS alone must stop them."""
    write = f"open({str(target)!r}, 'w').write('pwned')"
    return {
        "write": write,
        "ctypes system": f"import ctypes; ctypes.CDLL(None).system(b'touch {target}')",
        "fork and write": f"import os\nif os.fork() == 0:\n    {write}\n    os._exit(0)\nos.wait()",
        "kill gradprobe": f"import os, signal; os.kill({host_pid}, signal.SIGTERM)",
        "kill everything": "import os, signal; os.kill(-1, signal.SIGKILL)",
        "network": f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "host secrets": f"print(open('/proc/{host_pid}/environ', 'rb').read())",
        "user files": f"print(open({__file__!r}).read())",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                     "        pass",
        "daemon child": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)",
        "memory bomb": "x = bytearray(8 * 1024 ** 3)",
    }


def test_the_jail_stops_attacks_without_the_audit_hook(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GRADPROBE_TEST_SECRET", "hunter2")
    target = tmp_path / "escaped.txt"
    limits = sandbox.Limits(cpu_s=2, memory_bytes=256 << 20).as_args()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        for name, attack in jail_attacks(target, os.getpid(), server.getsockname()[1]).items():
            # The marker comment lets live_sandboxes() find any process it leaves behind.
            program = ("# gradprobe sandbox refuses\nimport resource\n"
                       f"for n, v in zip(('CPU', 'AS', 'FSIZE', 'NOFILE', 'NPROC'), {limits}):\n"
                       "    resource.setrlimit(getattr(resource, 'RLIMIT_' + n), (int(v), int(v)))\n"
                       + attack)
            start = time.monotonic()
            finished = sandbox.run_untrusted([sandbox.python_executable(), "-I", "-S", "-c", program],
                                             b"", "bwrap", 1.5, 1 << 16)
            assert time.monotonic() - start < 6, name
            assert not target.exists(), name
            assert b"hunter2" not in finished.stdout and b"jail_attacks" not in finished.stdout, name
            assert live_sandboxes() == [], name
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_the_jail_itself_holds_without_the_audit_hook(tmp_path) -> None:
    # A plain program in the jail: nobody, no network, no user files, read-only system.
    probe = (
        "import os, socket\n"
        "print(os.getuid(), os.getgid())\n"
        f"print(os.path.exists({str(tmp_path)!r}), os.path.exists({__file__!r}))\n"
        "for path in ('/usr/gradprobe-x', '/etc/gradprobe-x'):\n"
        "    try:\n        open(path, 'w')\n        print('wrote', path)\n"
        "    except OSError:\n        pass\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    print('network')\n"
        "except OSError:\n    pass\n"
        "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
    )
    finished = sandbox.run_untrusted([sandbox.python_executable(), "-I", "-S", "-c", probe], b"",
                                     "bwrap", 5.0, 1 << 16)
    lines = finished.stdout.decode().splitlines()
    assert finished.returncode == 0, finished.stderr
    assert lines[0] == "65534 65534"
    assert lines[1] == "False False"
    assert not any(line.startswith(("wrote", "network")) for line in lines)
    assert len(eval(lines[-1])) <= 3  # its own PID namespace: bwrap's init, itself, maybe sh


def test_killing_gradprobe_kills_the_jail(tmp_path) -> None:
    # gradprobe (here a child Python) is SIGKILLed mid-run: nothing of the jail survives it.
    script = ("from gradprobe.rewards.python_tests import run_python_tests\n"
              "run_python_tests('import time\\ntime.sleep(60)', 'assert f(1) == 1', timeout=60)\n")
    victim = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    deadline = time.monotonic() + 20
    while not _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _sandbox_processes(), "the jailed program never started"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert live_sandboxes() == []


def test_without_bwrap_python_tests_exits_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "no bwrap program on PATH")
    with pytest.raises(UserInputError, match="--allow-weak-sandbox.*|no bwrap"):
        score(right_if("True"))
    # The weak guard only when asked for, and it still decides outside.
    assert score(right_if("True"), isolation="weak") == 1.0
    assert score(FORGERIES["replaced builtins"], isolation="weak") == 0.0
    assert score(in_subinterpreter("pass") + right_if("True"), isolation="weak") == 0.0


def test_asserts_that_the_candidate_would_decide_are_refused() -> None:
    with pytest.raises(UserInputError, match="top-level"):
        plan_tests("def check(candidate):\n    assert candidate(1) == 2\ncheck(add)")
    with pytest.raises(UserInputError, match="not valid Python"):
        plan_tests("assert add(1, 2) ==")
    result = run_python_tests("def add(a, b):\n    return a + b",
                              "import math\nassert math.isclose(add(0.1, 0.2), 0.3)\n"
                              "assert sorted([add(2, 1), add(0, 1)]) == [1, 3]\n"
                              "assert not add(0, 0) and isinstance(add(1, 1), int)")
    assert result.passed, result.reason
