"""Verifiers for objective pairs: a tool decides instead of a model when it can check the answer.

- math: the prompt has a checkable arithmetic expression or a stated answer in metadata
  (``metadata["answer"]``); each response's final number is compared numerically.
- code: ``metadata["tests"]`` holds Python test code; each response's code block runs with the tests in
  a subprocess with a time limit, a memory limit, no network (a namespace when available, and the
  socket module disabled) and an empty environment.

A verifier returns "chosen", "rejected" (the one that is right) or None (cannot decide).
"""

from __future__ import annotations

import ast
import math
import operator
import os
import re
import resource
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from schemas.pairs import prompt_text

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
CODE_TIMEOUT_S = 5.0
CODE_MEMORY_BYTES = 512 << 20
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_EXPR = re.compile(r"(?:what is|compute|calculate|evaluate)\s+([-+*/().\d\s^x×÷]+)\??", re.I)


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("not arithmetic")


def expected_answer(pair: dict) -> float | None:
    meta = pair.get("metadata") or {}
    if "answer" in meta:
        try:
            return float(meta["answer"].replace(",", ""))
        except ValueError:
            return None
    m = _EXPR.search(prompt_text(pair))
    if not m:
        return None
    expr = m.group(1).replace("^", "**").replace("×", "*").replace("÷", "/").replace("x", "*").strip()
    try:
        return float(_eval(ast.parse(expr, mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError):
        return None


def final_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def verify_math(pair: dict) -> str | None:
    answer = expected_answer(pair)
    if answer is None:
        return None
    c, r = _close(final_number(pair["chosen"]), answer), _close(final_number(pair["rejected"]), answer)
    return "chosen" if c and not r else "rejected" if r and not c else None


def _limits() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (CODE_MEMORY_BYTES, CODE_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (int(CODE_TIMEOUT_S) + 1, int(CODE_TIMEOUT_S) + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    os.setsid()


_NO_NETWORK = (
    "import socket as _s\n"
    "def _blocked(*a, **k):\n    raise OSError('network disabled in the verifier sandbox')\n"
    "_s.socket = _blocked; _s.create_connection = _blocked; _s.getaddrinfo = _blocked\n"
)


def run_python(code: str, tests: str, timeout: float = CODE_TIMEOUT_S) -> bool:
    """True if ``code`` followed by ``tests`` exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="prefstream-verify-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w") as fh:
            fh.write(_NO_NETWORK + code + "\n\n" + tests + "\n")
        argv = [sys.executable, "-I", "-S", path]
        if os.path.exists("/usr/bin/unshare") and os.geteuid() == 0:
            argv = ["/usr/bin/unshare", "--net", "--", *argv]  # a network namespace with no interfaces
        try:
            proc = subprocess.run(argv, cwd=tmp, env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=timeout,
                                  preexec_fn=_limits, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def extract_code(text: str) -> str:
    blocks = CODE_BLOCK.findall(text)
    return "\n".join(blocks) if blocks else text


def verify_code(pair: dict) -> str | None:
    tests = (pair.get("metadata") or {}).get("tests")
    if not tests:
        return None
    # Both sides at once: each run is mostly waiting on a child process, so threads overlap them.
    c, r = _POOL.map(lambda side: run_python(extract_code(pair[side]), tests), ("chosen", "rejected"))
    return "chosen" if c and not r else "rejected" if r and not c else None


VERIFIERS = {"math": verify_math, "code": verify_code}
# Threads only wait on sandbox children; 4 pairs (8 children) at a time keeps 2 cores busy without
# letting one batch of code pairs fork dozens of interpreters.
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="verify-side")
_BATCH_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="verify")
MATH_CATEGORIES = {"arithmetic", "math_word_problem", "algebra", "unit_conversion", "statistics_probability"}


def verify_batch(pairs: list[dict[str, Any]]) -> list[tuple[str, str] | None]:
    """``verify`` for a micro-batch; code pairs run concurrently (the sandbox children do the work)."""
    return list(_BATCH_POOL.map(verify, pairs))


def verify(pair: dict[str, Any]) -> tuple[str, str] | None:
    """(verifier name, winner) when a verifier can decide this pair, else None."""
    meta = pair.get("metadata") or {}
    if meta.get("tests"):
        winner = verify_code(pair)
        return ("code", winner) if winner else None
    # A stated answer is checkable whatever the labeler thought of the prompt.
    if "answer" in meta or (pair.get("objectivity") == "factual" and pair.get("task_category") in MATH_CATEGORIES):
        winner = verify_math(pair)
        return ("math", winner) if winner else None
    return None
