"""Simulated annotators: sign in through the HTTP API like real users and answer with a known accuracy.

They are told the truth the way a generator knows it: a mapping pair_id -> text of the truly better
response (from a JSONL of pairs whose ``metadata.truth`` says ``chosen`` or ``rejected``; the
pair's own label otherwise). An annotator picks the better side with probability ``accuracy``,
else the other one. Tasks whose pair has no known truth get a coin flip and are not scored.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


@dataclass
class SimStats:
    answered: int = 0
    scored: int = 0
    correct: int = 0
    per_annotator: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def load_truths(path: Path) -> dict[str, str]:
    """pair_id -> text of the better response, from a JSONL of pairs."""
    import json

    from schemas.pairs import validate_pair

    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            pair = validate_pair(obj)
            flipped = (obj.get("metadata") or {}).get("truth") == "rejected"
            out[pair["pair_id"]] = pair["rejected"] if flipped else pair["chosen"]
    return out


def call(client: httpx.Client, method: str, path: str, **kw: object) -> httpx.Response:
    """One API call; waits out the app's per-token rate limit (429 + Retry-After) like a polite client."""
    while True:
        r = client.request(method, path, **kw)
        if r.status_code != 429:
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))


def simulate(base_url: str, tokens: list[str], accuracy: float, truths: dict[str, str], max_tasks: int | None = None,
             idle_s: float = 5.0, seed: int = 0, expert_tokens: list[str] | None = None,
             stop: threading.Event | None = None) -> SimStats:
    """One thread per token, until no annotator got a task for ``idle_s`` seconds (or ``max_tasks``).

    ``expert_tokens`` sign in to the expert view and answer escalated tasks (always correctly: an
    expert's verdict is final, and the simulation models a trusted expert). ``stop`` ends them early.
    """
    stop = stop or threading.Event()
    stats = SimStats()
    lock = threading.Lock()
    last_work = [time.monotonic()]

    def annotator(i: int, token: str, expert: bool = False) -> None:
        rng = random.Random(seed * 1000 + i)
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
                better = truths.get(t["task_id"].split(":")[0])
                right = "A" if better == t["A"] else "B" if better == t["B"] else rng.choice("AB")
                verdict = right if expert or rng.random() < accuracy else ("B" if right == "A" else "A")
                call(client, "POST", f"/api/tasks/{t['task_id']}/verdict", json={"verdict": verdict}).raise_for_status()
                with lock:
                    stats.answered += 1
                    if better is not None:
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
