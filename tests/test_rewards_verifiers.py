"""The verifiable rewards: math answers, countdown equations and the python_tests sandbox."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

from gradprobe.errors import UserInputError
from gradprobe.rewards import resolve_reward
from gradprobe.rewards.countdown import countdown
from gradprobe.rewards.math_answer import math_answer
from gradprobe.rewards.python_tests import extract_code, python_tests, run_python_tests

# ---------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5"),
        ("So the answer is \\boxed{\\frac{1}{2}}.", "1/2"),
        ("The answer is 1/2", "\\frac{1}{2}"),
        ("Therefore $x = 2$.", "2"),
        ("\\boxed{2}", "x = 2"),
        ("\\boxed{2^{1/2}}", "\\sqrt{2}"),
        ("\\boxed{(x+1)^2}", "x^2 + 2x + 1"),
        ("First I thought 3, but the final answer is \\boxed{4}", "4"),
    ],
)
def test_math_accepts_equivalent_answers(completion: str, answer: str) -> None:
    assert math_answer(completion, answer, prompt="p", task="t", tests=None) == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("\\boxed{3}", "x = 2"),
        ("\\boxed{0.51}", "1/2"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("no answer at all", "7"),
        ("garbage )))((( \\frac{", "7"),
        ("", "7"),
        ("\\boxed{5}", None),
        ("\\boxed{5}", ""),
    ],
)
def test_math_rejects_other_answers_and_garbage(completion: str, answer: str | None) -> None:
    assert math_answer(completion, answer) == 0.0


@pytest.mark.parametrize("huge", ["\\boxed{9^{9^{9}}}", "\\boxed{10^{10^{10^{10}}}}",
                                  "\\boxed{100000!}", "\\boxed{(x+1)^{100000}}"])
def test_math_refuses_answers_too_big_to_compare(huge: str) -> None:
    start = time.monotonic()
    assert math_answer(huge, "2") == 0.0
    assert time.monotonic() - start < 2


def test_math_works_in_worker_threads_without_signal_timeouts() -> None:
    cases = [("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("\\boxed{3}", "2", 0.0),
             ("\\boxed{9^{9^{9}}}", "2", 0.0)] * 3
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(lambda case: math_answer(case[0], case[1]), cases))
    assert scores == [want for _, _, want in cases]


def test_math_resolves_from_the_registry() -> None:
    assert resolve_reward("math")("\\boxed{4}", "4", prompt="2+2?", task="arith") == 1.0


# ----------------------------------------------------------------------------------- countdown

NUMBERS = {"numbers": [3, 5, 7, 8], "target": 22}


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>3 * 5 + 7</answer>",
        "<answer>(8 - 5) * 7 + 1</answer> is wrong, so <answer>3*5+7 = 22</answer>",
        "Let me try.\n3*5 = 15\n15+7 = 22\nSo: 3 × 5 + 7 = 22",
        "<answer>$3 \\times 5 + 7$</answer>",
        "<answer>22 = 7 + 3*5</answer>",
    ],
)
def test_countdown_accepts_valid_equations(completion: str) -> None:
    assert countdown(completion, None, **NUMBERS) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>3 * 5 + 7 + 3 - 3</answer>",  # 3 used twice
        "<answer>(8 - 5) * 7</answer>",  # 21, not 22
        "<answer>2 * 11</answer>",  # numbers not given
        "<answer>7 * 3 + 1.0</answer>",  # a float literal
        "<answer>8 / (5 - 5)</answer>",  # division by zero (and 5 reused)
        "<answer>3 * 5 + 7</answer> then <answer>3 + 5</answer>",  # the last block counts
        "no equation here",
        "",
    ],
)
def test_countdown_rejects_invalid_equations(completion: str) -> None:
    assert countdown(completion, None, **NUMBERS) == 0.0


@pytest.mark.parametrize(
    "malicious",
    [
        "<answer>__import__('os').system('touch /tmp/gradprobe_pwned')</answer>",
        "<answer>(3).__class__.__mro__</answer>",
        "<answer>9**9**9</answer>",
        "<answer>" + "(" * 150 + "3" + ")" * 150 + "</answer>",
        "<answer>" + "-" * 100_000 + "3</answer>",
        "<answer>" + "3+" * 500_000 + "3</answer>",
        "<answer>" * 200_000,
        "<answer>" + "9" * 5000 + "</answer>",
        "<answer>lambda: 3</answer>",
    ],
)
def test_countdown_scores_malicious_input_zero_quickly(malicious: str) -> None:
    start = time.monotonic()
    assert countdown(malicious, None, **NUMBERS) == 0.0
    assert time.monotonic() - start < 1
    assert not os.path.exists("/tmp/gradprobe_pwned")


def test_countdown_reads_numbers_from_the_answer() -> None:
    assert countdown("<answer>8/(3-8/3)</answer>", '{"numbers": [3, 3, 8, 8], "target": 24}') == 1
    assert countdown("<answer>3*5+7</answer>", "target=22; numbers=3 5 7 8") == 1.0
    assert countdown("<answer>3*5+7</answer>", {"numbers": "3 5 7", "target": "22"}) == 1.0
    assert countdown("<answer>3*5+7</answer>", None, numbers="3 5 7 8", target=22,
                     use_all=True) == 0.0


def test_countdown_without_numbers_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="numbers"):
        countdown("<answer>1+2</answer>", "3")


# --------------------------------------------------------------------------------- python_tests

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
FAST = {"timeout": 2.0, "memory_mb": 256}


def sandbox(code: str, tests: str = TESTS, **options) -> float:
    return python_tests(f"```python\n{code}\n```", None, tests=tests, **{**FAST, **options})


def test_sandbox_passes_a_correct_solution() -> None:
    completion = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert python_tests(completion, None, tests=TESTS, prompt="p", task="code") == 1.0
    assert python_tests(completion, TESTS) == 1.0  # tests taken from the answer
    assert python_tests(completion, None, tests=TESTS.splitlines()) == 1.0


def test_sandbox_fails_a_wrong_solution_and_early_exits() -> None:
    assert sandbox("def add(a, b):\n    return a - b") == 0.0
    assert sandbox("import sys\nsys.exit(0)") == 0.0
    assert sandbox("import os\nos._exit(0)") == 0.0
    assert sandbox("def add(a, b) return a") == 0.0  # syntax error


def test_sandbox_stops_an_infinite_loop_in_time() -> None:
    start = time.monotonic()
    assert sandbox("def add(a, b):\n    while True:\n        pass", timeout=1.0) == 0.0
    assert sandbox("import time\ntime.sleep(60)", timeout=1.0) == 0.0
    assert time.monotonic() - start < 2 * (1.0 + 1.0) + 2.0  # two runs, timeout + grace each


def test_sandbox_survives_a_memory_bomb() -> None:
    assert sandbox("x = bytearray(4 * 1024 ** 3)") == 0.0
    assert sandbox("x = []\nwhile True:\n    x.append(' ' * 10 ** 7)") == 0.0


def test_sandbox_survives_a_fork_bomb() -> None:
    start = time.monotonic()
    assert sandbox("import os\nwhile True:\n    os.fork()") == 0.0
    assert sandbox("import subprocess, sys\nwhile True:\n"
                   "    subprocess.Popen([sys.executable, '-c', 'pass'])") == 0.0
    assert sandbox("import multiprocessing as mp\np = mp.Process(target=print)\np.start()") == 0.0
    assert time.monotonic() - start < 10


def test_sandbox_cannot_write_outside_its_directory(tmp_path) -> None:
    target = tmp_path / "escaped.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w').write('x')",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.close(os.open('escaped.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
    ]
    for attempt in attempts:
        assert sandbox(attempt + "\ndef add(a, b):\n    return a + b") == 0.0, attempt
        assert not target.exists(), attempt
    # A directory it may read (the Python installation) must not become a dir_fd to write via.
    planted = os.path.join(sys.prefix, "gradprobe_planted.pth")
    try:
        code = (f"import os\nfd = os.open({sys.prefix!r}, os.O_RDONLY)\n"
                "os.close(os.open('gradprobe_planted.pth', os.O_CREAT | os.O_WRONLY, dir_fd=fd))")
        assert sandbox(code + "\ndef add(a, b):\n    return a + b") == 0.0
        assert not os.path.exists(planted)
    finally:
        if os.path.exists(planted):
            os.remove(planted)
    # Writing inside its own directory is fine.
    assert sandbox("open('scratch.txt', 'w').write('x')\ndef add(a, b):\n    return a + b") == 1.0


def test_sandbox_does_not_inherit_secrets(monkeypatch) -> None:
    monkeypatch.setenv("GRADPROBE_TEST_SECRET", "hunter2")
    add = "\ndef add(a, b):\n    return a + b"
    leak = "import os\nassert os.environ.get('GRADPROBE_TEST_SECRET') == 'hunter2'"
    assert sandbox(leak + add) == 0.0
    assert sandbox("assert 'hunter2' in open('/proc/self/environ').read()" + add) == 0.0
    assert sandbox("import os\nassert 'GRADPROBE_TEST_SECRET' not in os.environ" + add) == 1.0


def test_sandbox_blocks_network() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "def add(a, b):\n    return a + b")
        assert sandbox(code) == 0.0
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_sandbox_bounds_a_flood_of_output() -> None:
    tracemalloc.start()
    start = time.monotonic()
    try:
        score = sandbox("print('x' * 100_000_000)\ndef add(a, b):\n    return a + b",
                        memory_mb=512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert score in (0.0, 1.0)
    assert peak < 5 * 2**20  # gradprobe read a bounded slice, not 100 MB
    assert time.monotonic() - start < 10


def test_sandbox_runs_ordinary_library_code() -> None:
    code = ("import collections, dataclasses, json, threading, typing\n"
            "P = collections.namedtuple('P', 'a b')\n"
            "@dataclasses.dataclass\nclass D:\n    x: int\n"
            "def add(a, b):\n    return P(a, b).a + D(b).x")
    assert sandbox(code) == 1.0


def test_sandbox_is_safe_from_threads() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = list(pool.map(sandbox, ["def add(a, b):\n    return a + b",
                                         "def add(a, b):\n    return a * b"]))
    assert scores == [1.0, 0.0]
    assert threading.active_count() >= 1


def test_run_python_tests_reports_why() -> None:
    result = run_python_tests("x = 1", "assert x == 2", timeout=2)
    assert not result.passed and result.reason == "assert x == 2 does not hold"
    result = run_python_tests("x = 1 / 0", "assert x == 2", timeout=2)
    assert not result.passed and "ZeroDivisionError" in result.reason


def test_extract_code_prefers_the_last_python_block() -> None:
    text = "```bash\nls\n```\n```python\nA = 1\n```\ntext\n```python\nA = 2\n```"
    assert extract_code(text) == "A = 2"
    assert extract_code("```\nA = 3\n```") == "A = 3"
    assert extract_code("```python\nA = 4") == "A = 4"  # cut off before the closing fence
    assert extract_code("A = 5") == "A = 5"


def test_python_tests_without_tests_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="assert"):
        python_tests("def f(): pass", None)
    with pytest.raises(UserInputError, match="assert"):
        python_tests("def f(): pass", "def reference(): pass")
