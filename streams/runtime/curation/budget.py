"""The review budget (PREFSTREAM_WORKER_REVIEW_BUDGET): how many review candidates reach humans.

Two forms: ``N/h``, at most N review tasks per clock hour (UTC) from this worker, or ``X%``, at
most X% of the pairs this worker routed since it started. Each batch is routed whole first; when its
review candidates exceed what the budget has left, the most informative keep their review task
(lowest calibrated p first: mispredicted before uncertain) and the rest (highest p first) are
deferred: their ScoredPair says route ``deferred`` and goes to prefs.deferred as well, where the
second look (streams/runtime/deferred.py) scores them again when a newer version serves.

The count lives in the worker's memory: a batch that is rolled back and redone counts its reviews
twice, which errs towards deferring, never towards losing a pair.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from streams.kafka import topics
from streams.kafka.transactions import Output
from streams.review_budget import BudgetSpec
from streams.runtime.outputs import Emitter, scored_record
from streams.runtime.processors.router import Route

HOUR_S = 3600
DEFERRED = "deferred"


class ReviewBudget:
    """What is left of the budget; ``clock`` gives epoch seconds (the hour form counts per clock hour)."""

    def __init__(self, spec: BudgetSpec | None, clock: Callable[[], float] = time.time) -> None:
        self.spec, self.clock = spec, clock
        self.hour = -1
        self.reviewed = 0  # review tasks this hour (N/h) or since start (X%)
        self.scored = 0  # pairs routed since start (X%)

    def _roll(self) -> None:
        hour = int(self.clock() // HOUR_S)
        if self.spec is not None and self.spec.per_hour is not None and hour != self.hour:
            self.hour, self.reviewed = hour, 0

    def allow(self, candidates: int, scored: int) -> int:
        """How many of a batch's ``candidates`` may go to review, the batch having ``scored`` routed pairs;
        those are counted as spent."""
        self._roll()
        self.scored += scored
        if self.spec is None:
            allowed = candidates
        elif self.spec.per_hour is not None:
            allowed = max(0, min(candidates, self.spec.per_hour - self.reviewed))
        elif self.spec.share is not None:
            # A small tolerance: 30% of 10 is 3, not 2.9999999999999996.
            allowed = max(0, min(candidates, math.floor(self.spec.share * self.scored + 1e-9) - self.reviewed))
        else:  # parse_budget gives a share or a rate: a spec with neither limits nothing
            allowed = candidates
        self.reviewed += allowed
        return allowed

    def spend(self, reviews: int) -> None:
        """Count review tasks sent past the budget (the second look's, which are never deferred twice)."""
        self._roll()
        self.reviewed += reviews


def defer_beyond(ps: Sequence[float], allowed: int) -> set[int]:
    """Indices into ``ps`` (the candidates' calibrated p) to defer: all but the ``allowed`` lowest p."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    return set(order[max(0, allowed):])


def apply_budget(decisions: list[Route | BaseException], ps: list[float], budget: ReviewBudget,
                 versions: list[str]) -> list[Route | BaseException]:
    """``decisions`` with the review candidates the budget has no room for turned into deferrals.

    ``ps`` and ``versions`` are each pair's calibrated p and the version that scored it; an exception in
    ``decisions`` (a pair that could not be routed) is passed through and not counted.
    """
    routed = {i: d for i, d in enumerate(decisions) if isinstance(d, Route)}
    candidates = [i for i, d in routed.items() if d.kind == "review"]
    allowed = budget.allow(len(candidates), len(routed))
    out = list(decisions)
    for j in defer_beyond([ps[i] for i in candidates], allowed):
        i = candidates[j]
        d = routed[i]
        out[i] = Route(DEFERRED, f"review budget {budget.spec.text if budget.spec else ''} spent: {d.reason}, "
                                 f"p={ps[i]:.3f} by {versions[i]}", d.k)
    return out


def deferred_outputs(emit: Emitter, pair: dict, score: dict, decision: Route) -> list[Output]:
    """A deferred pair's ScoredPair, on prefs.scored (its route for downstream) and on prefs.deferred
    (where the second look finds it; the record's Kafka timestamp is when it was deferred)."""
    record = scored_record(pair, score, decision)
    key = pair["pair_id"].encode()
    return [emit.out(topics.SCORED, "ScoredPair", key, record), emit.out(topics.DEFERRED, "ScoredPair", key, record)]
