"""Simulated annotators: sign in through the HTTP API like real users and answer with a known accuracy.

They are told the truth the way a generator knows it: a mapping from a pair's two responses
(``truth_key``: a served task shows them, but no pair id) to a ``Truth`` (from a JSONL of
pairs whose ``metadata.truth`` says ``chosen`` or ``rejected``, or ``tie`` / ``both_bad`` where the
data says neither response is better; the pair's own label otherwise). An annotator gives the right
verdict with probability ``accuracy``, else the other side (a random side when the truth is a tie or
both_bad). Tasks whose pair has no known truth get a coin flip and are not scored.

A verdict for a side carries a strength: the one the data states (``metadata.strength``: slightly,
clearly or much) when the verdict is right, otherwise one drawn uniformly from its own random stream,
so the sides drawn stay those of a run without strengths. A tie or both_bad verdict comes only from a
truth that says so: none is made up where the data names a better response.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from schemas.records import STRENGTHS, UNRANKED_SPLITS

log = logging.getLogger(__name__)


@dataclass
class SimStats:
    answered: int = 0
    scored: int = 0
    correct: int = 0
    per_annotator: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Truth:
    """What the data says of a pair: the text of the better response (None when neither is), the right
    verdict (``preferred``, or ``tie`` / ``both_bad``) and how much better, when the data says so."""

    better: str | None
    verdict: str = "preferred"
    strength: str | None = None


def truth_key(a: str, b: str) -> frozenset[str]:
    """What a pair's truth is filed under: its two responses, in either order."""
    return frozenset((a, b))


def load_truths(path: Path) -> dict[frozenset[str], Truth]:
    """truth_key(chosen, rejected) -> Truth, from a JSONL of pairs (``metadata.truth``, ``metadata.strength``)."""
    from schemas.formats import read_objects
    from schemas.pairs import validate_pair

    out = {}
    for obj in read_objects(path):
        pair = validate_pair(obj)
        meta = obj.get("metadata") or {}
        strength = meta.get("strength") if meta.get("strength") in STRENGTHS else None
        if meta.get("truth") in UNRANKED_SPLITS:
            out[truth_key(pair["chosen"], pair["rejected"])] = Truth(None, meta["truth"])
        else:
            better = pair["rejected"] if meta.get("truth") == "rejected" else pair["chosen"]
            out[truth_key(pair["chosen"], pair["rejected"])] = Truth(better, strength=strength)
    return out


def call(client: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
    """One API call; waits out the app's per-token rate limit (429 + Retry-After) like a polite client."""
    while True:
        r = client.request(method, path, **kw)
        if r.status_code != 429:
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))


def simulate(base_url: str, tokens: list[str], accuracy: float, truths: Mapping[frozenset[str], Truth | str],
             max_tasks: int | None = None,
             idle_s: float = 5.0, seed: int = 0, expert_tokens: list[str] | None = None,
             stop: threading.Event | None = None) -> SimStats:
    """One thread per token, until no annotator got a task for ``idle_s`` seconds (or ``max_tasks``).

    ``truths`` maps truth_key(chosen, rejected) to a Truth, or to the better response's text alone. ``expert_tokens`` sign
    in to the expert view and answer escalated tasks (always correctly: an expert's verdict is final,
    and the simulation models a trusted expert). ``stop`` ends them early.
    """
    stop = stop or threading.Event()
    stats = SimStats()
    lock = threading.Lock()
    last_work = [time.monotonic()]

    def annotator(i: int, token: str, expert: bool = False) -> None:
        rng = random.Random(seed * 1000 + i)
        strengths = random.Random(f"{seed}:{i}:strength")  # its own stream: the verdicts drawn stay the same
        path = "/api/tasks/next?expert=true" if expert else "/api/tasks/next"
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            while time.monotonic() - last_work[0] < idle_s and not stop.is_set():
                with lock:
                    if max_tasks is not None and stats.answered >= max_tasks:
                        return
                r = call(client, "GET", path)
                if r.status_code == 204:
                    time.sleep(0.2)
                    continue
                r.raise_for_status()
                t = r.json()
                truth = truths.get(truth_key(t["A"], t["B"]))
                truth = Truth(truth) if isinstance(truth, str) else truth
                if truth is not None and truth.verdict in UNRANKED_SPLITS:
                    right = truth.verdict
                else:
                    better = truth.better if truth else None
                    right = "A" if better == t["A"] else "B" if better == t["B"] else rng.choice("AB")
                wrong = {"A": "B", "B": "A"}.get(right) or rng.choice("AB")
                verdict = right if expert or rng.random() < accuracy else wrong
                body = {"verdict": verdict}
                if verdict in ("A", "B"):
                    stated = truth.strength if truth and verdict == right else None
                    body["strength"] = stated or strengths.choice(STRENGTHS)
                call(client, "POST", f"/api/tasks/{t['task_id']}/verdict", json=body).raise_for_status()
                with lock:
                    stats.answered += 1
                    if truth is not None:
                        stats.scored += 1
                        stats.correct += verdict == right
                    stats.per_annotator[t["annotator"]] = stats.per_annotator.get(t["annotator"], 0) + 1
                    last_work[0] = time.monotonic()

    def guarded(i: int, token: str, expert: bool = False) -> None:
        try:
            annotator(i, token, expert)
        except Exception as exc:  # a dead annotator thread would otherwise only show as missing verdicts
            log.error("simulated annotator %d stopped: %r", i, exc)
            with lock:
                stats.errors.append(f"annotator {i}: {exc!r}")

    threads = [threading.Thread(target=guarded, args=(i, tok), daemon=True) for i, tok in enumerate(tokens)]
    threads += [threading.Thread(target=guarded, args=(100 + i, tok, True), daemon=True)
                for i, tok in enumerate(expert_tokens or [])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stats
