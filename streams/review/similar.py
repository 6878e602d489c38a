"""What the humans decided about a review task's similar pairs, read when the task is served.

Read from the aggregator's Redis state at serve time rather than copied into the task, so a similar
pair verified after the task was made still shows its label.

Orientation: a similar pair's ``chosen`` and ``rejected`` are the pair as the worker indexed it,
which is the pair as its own review task showed it (both are the scored pair before any flip), and
the aggregator's final label is relative to that review task's pair. So ``verified.preferred`` says
which of the similar pair's *shown* responses the humans preferred: "chosen" (the label held) or
"rejected" (the humans preferred the response shown as rejected).

Counts come from the votes of the pair's review task and of its expert task (their ids derived from
the pair id, streams/review/task_ids.py), which expire with the tasks' other keys after the review retention period; the
label itself does not, so an older verified pair shows its label with the counts and ``expert`` None.
"""

from __future__ import annotations

from typing import Any

from streams.review import task_ids
from streams.review.aggregator import final_key, votes_key
from streams.review.task_ids import TaskIds


def with_verified(redis: Any, queue_prefix: str, similar: list[dict[str, Any]],
                  ids: TaskIds | None = None) -> list[dict[str, Any]]:
    """``similar`` with ``verified`` on each pair: None when the humans have not verified it, else
    {"preferred": "chosen" | "rejected" | "tie" | "both_bad", "verdicts": annotator verdicts, "agreeing":
    those for the preferred verdict, "expert": whether an expert decided it after the annotators split}; the counts
    and ``expert`` are None once the votes have expired."""
    if not similar:
        return []
    finals = redis.hmget(final_key(queue_prefix), [s["pair_id"] for s in similar])
    pipe = redis.pipeline(transaction=False)
    if any(final is not None for final in finals):
        ids = ids or TaskIds(redis, queue_prefix)
        for s, final in zip(similar, finals, strict=True):
            if final is not None:
                pipe.hvals(votes_key(queue_prefix, ids.of(s["pair_id"])))
                pipe.exists(votes_key(queue_prefix, ids.of(s["pair_id"], task_ids.EXPERT)))
    answers = iter(pipe.execute())
    out = []
    for s, final in zip(similar, finals, strict=True):
        verified = None
        if final is not None:
            side = final.decode()
            votes, by_expert = [v.decode() for v in next(answers)], bool(next(answers))
            verified = {"preferred": side, "verdicts": len(votes) or None,
                        "agreeing": sum(v == side for v in votes) if votes else None,
                        "expert": True if by_expert else (False if votes else None)}
        out.append(dict(s, verified=verified))
    return out
