"""The sandbox: each escape a model could try is blocked, by the in-Python guards and, with those
switched off, by the operating-system layer alone. Every call is bounded by its own timeout, and
forks are refused by RLIMIT_NPROC, so a failing test cannot take the machine down."""

from __future__ import annotations

import os

import pytest

from nanochat_core.sandbox import calculate, check_expression, isolation, run_python

BARE = dict(python_guards=False, timeout_s=10)


@pytest.mark.parametrize("expr,value", [
    ("16-3-4", "9"), ("44/4", "11"), ("200*25/100", "50"), ("7/2", "3.5"), ("2**10", "1024"), ("-(3+4)*2", "-14"),
    ("'strawberry'.count('r')", "3"), ("len('hello')", "5"), ("max(3, 9)", "9"),
])
def test_calculator_values(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('id')", "open('/etc/passwd').read()", "(1).__class__", "[x for x in 'ab']",
    "lambda: 1", "x", "print(1)", "'a'.__class__", "1; 2", "a = 1",
])
def test_calculator_rejects_everything_but_arithmetic_and_strings(expr):
    result = calculate(expr)
    assert result.startswith("error:"), result
    with pytest.raises(ValueError):
        check_expression(expr)


def test_calculator_errors_are_strings_not_exceptions():
    assert calculate("1/0") == "error: ZeroDivisionError: division by zero"
    assert calculate("9**9**9", timeout_s=2).startswith("error: timed out")
    assert calculate("(" * 5000).startswith("error:")


def test_runs_ordinary_code_with_allowed_imports():
    result = run_python("import math\nfrom typing import List\ndef f(xs: List[int]): return math.prod(xs)\nprint(f([2, 3, 4]))")
    assert result.ok and result.output == "24\n" and result.error is None
    failing = run_python("assert 1 == 2, 'wrong'")
    assert not failing.ok and failing.error == "AssertionError: wrong"


def test_blocks_file_access():
    guarded = run_python("print(open('/etc/passwd').read())")
    assert not guarded.ok and "open is not allowed" in guarded.error
    assert os.path.exists("/etc/passwd")
    write = run_python("open('/tmp/nanochat-sandbox-probe', 'w').write('x')", **BARE)
    assert not write.ok and not os.path.exists("/tmp/nanochat-sandbox-probe")


@pytest.mark.skipif(not isolation()["chroot"], reason="this machine allows no chroot: the OS layer cannot hide files")
def test_os_layer_hides_the_filesystem():
    """Without the Python guards, an empty read-only root directory: nothing of the host to read."""
    bare = run_python("print(open('/etc/passwd').read())", **BARE)
    assert not bare.ok and "FileNotFoundError" in bare.error
    listing = run_python("import os\nprint(os.listdir('/'))", **BARE)
    assert listing.ok and listing.output == "[]\n"


def test_blocks_imports():
    for module in ("os", "subprocess", "socket", "ctypes", "importlib", "builtins"):
        result = run_python(f"import {module}")
        assert not result.ok and f"import of {module} is not allowed" in result.error
    # Reaching os through object internals still meets the audit hook.
    escape = ("c = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\n"
              "c.__init__.__globals__['system']('touch /tmp/nanochat-sandbox-pwned')")
    result = run_python(escape)
    assert not result.ok and "os.system is not allowed" in result.error
    assert not os.path.exists("/tmp/nanochat-sandbox-pwned")
    assert "compile is not allowed" in run_python("eval('1+1')").error


@pytest.mark.skipif(not isolation()["netns"], reason="this machine allows no network namespace")
def test_blocks_network():
    guarded = run_python("import socket")
    assert not guarded.ok
    # The OS layer alone: a fresh network namespace has no route anywhere, not even loopback.
    for target in ("('10.0.0.1', 80)", "('127.0.0.1', 9)"):
        bare = run_python(f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect({target})", **BARE)
        assert not bare.ok and "unreachable" in bare.error.lower(), bare


def test_blocks_fork_bombs():
    assert "import of os is not allowed" in run_python("import os\nwhile True: os.fork()").error
    via_internals = ("g = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
                     ".__init__.__globals__\nwhile True: g['fork']()")
    guarded = run_python(via_internals)
    assert not guarded.ok and "os.fork is not allowed" in guarded.error
    # Without the Python guards RLIMIT_NPROC refuses the very first fork (the process runs as nobody
    # when we are root), so the bomb never starts; the session kill would reap any survivor anyway.
    bare = run_python("import os\nwhile True: os.fork()", **BARE)
    assert not bare.ok and ("BlockingIOError" in bare.error or "Resource temporarily unavailable" in bare.error), bare


def test_stops_runaway_loops_and_memory_hogs():
    loop = run_python("while True: pass", timeout_s=1.5)
    assert not loop.ok and loop.error.startswith("timed out")
    hog = run_python("x = ' ' * (2 * 10**9)", memory_mb=128)
    assert not hog.ok and "MemoryError" in hog.error
    bare_hog = run_python("x = bytearray(2 * 10**9)", memory_mb=128, python_guards=False)
    assert not bare_hog.ok


def test_runs_unprivileged_when_root():
    if not isolation()["drop"]:
        pytest.skip("not running as root")
    result = run_python("import os\nprint(os.getuid(), os.getgid())", **BARE)
    assert result.ok and result.output.split() == ["65534", "65534"]
