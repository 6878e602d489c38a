"""Verifiers for objective pairs: a tool decides instead of a model when it can check the answer.

- math: the prompt has a checkable arithmetic expression or a stated answer in metadata
  (``metadata["answer"]``); each response's final number is compared numerically.
- code: ``metadata["tests"]`` holds Python test code; each response's code block runs with the tests in
  a bubblewrap sandbox (``sandbox.py``: empty environment, no network, read-only system, private /tmp,
  own PID namespace, limits on processes, the run's total memory, CPU, files, output and wall time).
  A response passes only on evidence: the harness's random token for that run, written after every
  test ran (harness.py); an exit status of 0 is not enough. Where no sandbox works the code verifier
  is off: it returns None and the code is never run.

A verifier returns "chosen", "rejected" (the one that is right) or None (cannot decide).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from schemas.pairs import prompt_text
from streams.runtime import sandbox
from streams.runtime.processors.stage import Item, Stage

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
CODE_TIMEOUT_S = 5.0
CODE_MEMORY_BYTES = 512 << 20
_OPS: dict[type[ast.AST], Callable[..., Any]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
_EXPR = re.compile(r"(?:what is|compute|calculate|evaluate)\s+([-+*/().\d\s^x×÷]+)\??", re.I)


# Bounds checked before anything is parsed or evaluated, so a prompt cannot make the verifier
# recurse (ast.parse and _eval are recursive: "1+1+...+1" with 5,000 terms was a RecursionError),
# allocate giant integers ((10^100)^100...) or spend seconds: an arithmetic question a person asks
# fits easily. Past a bound the verifier says "cannot decide" and the models and reviewers do.
MAX_EXPR_CHARS = 200
MAX_EXPR_DEPTH = 10  # nested parentheses
MAX_EXPR_NODES = 100
MAX_LITERAL_DIGITS = 30
MAX_RESULT_BITS = 1024  # any intermediate integer; floats overflow to OverflowError on their own
MAX_NUMBER_CHARS = 400  # a response's final number, and metadata.answer


class _Unverifiable(Exception):
    """The expression is outside what the math verifier checks; it cannot decide the pair."""


def _too_big(value: float) -> bool:
    return isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > 100:
                raise _Unverifiable("exponent too large")
            # |left|^right has about bits(left) * right bits: refuse before computing it.
            if isinstance(left, int) and isinstance(right, int) and abs(left).bit_length() * abs(right) > MAX_RESULT_BITS:
                raise _Unverifiable("power too large")
        result = _OPS[type(node.op)](left, right)
        if _too_big(result) or isinstance(result, complex):
            raise _Unverifiable("result too large")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise _Unverifiable("not arithmetic")


def _depth(expr: str) -> int:
    depth = deepest = 0
    for ch in expr:
        depth += ch == "("
        depth -= ch == ")"
        deepest = max(deepest, depth)
    return deepest


def evaluate(expr: str) -> float | None:
    """The value of an arithmetic expression from a prompt, or None when it is not one this verifier checks."""
    if len(expr) > MAX_EXPR_CHARS or _depth(expr) > MAX_EXPR_DEPTH:
        return None
    if any(len(d) > MAX_LITERAL_DIGITS for d in re.findall(r"\d+", expr)):
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        if sum(1 for _ in ast.walk(tree)) > MAX_EXPR_NODES:
            return None
        value = float(_eval(tree.body))
    except (_Unverifiable, ValueError, SyntaxError, ArithmeticError, TypeError, RecursionError, MemoryError):
        return None  # ArithmeticError: ZeroDivisionError and OverflowError
    return value if math.isfinite(value) else None


def _number(text: str) -> float | None:
    text = text.replace(",", "")
    if len(text) > MAX_NUMBER_CHARS:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def expected_answer(pair: dict) -> float | None:
    meta = pair.get("metadata") or {}
    if "answer" in meta:
        return _number(meta["answer"].strip())
    m = _EXPR.search(prompt_text(pair)[:100_000])  # a question is asked near the start; bound the regex's work
    if not m:
        return None
    expr = m.group(1).replace("^", "**").replace("×", "*").replace("÷", "/").replace("x", "*").strip()
    return evaluate(expr)


def final_number(text: str) -> float | None:
    # The last number in the response's last 200,000 characters (a 1 MiB response costs one bounded scan); a
    # number longer than MAX_NUMBER_CHARS (a 5,000-digit one) is no answer a verifier compares.
    found = NUMBER.findall(text[-200_000:])
    return _number(found[-1]) if found else None


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def verify_math(pair: dict) -> str | None:
    answer = expected_answer(pair)
    if answer is None:
        return None
    c, r = _close(final_number(pair["chosen"]), answer), _close(final_number(pair["rejected"]), answer)
    return "chosen" if c and not r else "rejected" if r and not c else None


def run_python(code: str, tests: str, timeout: float = CODE_TIMEOUT_S) -> bool:
    """True if every test ran after ``code`` and passed within the limits of the sandbox, shown by the
    harness's token for this run (False, never run, without a sandbox)."""
    limits = sandbox.Limits(timeout_s=timeout, memory_bytes=CODE_MEMORY_BYTES, cpu_s=int(timeout) + 1)
    return sandbox.run_tests(code, tests, limits).passed


def extract_code(text: str) -> str:
    blocks = CODE_BLOCK.findall(text)
    return "\n".join(blocks) if blocks else text


def verify_code(pair: dict) -> str | None:
    tests = (pair.get("metadata") or {}).get("tests")
    if not tests or not sandbox.available():
        return None  # no sandbox here: untrusted code never runs, the pair takes the model route
    # Both sides at once: each run is mostly waiting on a child process, so threads overlap them.
    c, r = _POOL.map(lambda side: run_python(extract_code(pair[side]), tests), ("chosen", "rejected"))
    return "chosen" if c and not r else "rejected" if r and not c else None


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


class VerifyStage(Stage[tuple[str, str] | None]):
    """A tool's verdict where one can check the pair (``Item.verdict``); vouches without a producer key's
    signature were stripped at ingest (streams/runtime/curation/trust.py)."""

    name = timer = "verify"

    def run(self, items: list[Item]) -> list[tuple[str, str] | None]:
        return verify_batch([i.pair for i in items])

    def keep(self, item: Item, result: tuple[str, str] | None) -> None:
        item.verdict = result
