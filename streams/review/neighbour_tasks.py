"""What a ``neighbour_of_error`` review task says, and what its verdict means.

The worker's error-driven expansion (streams/runtime/expansion.py) sends a pair to review when a human verdict
corrected the model on a similar pair; the task's reason starts ``neighbour_of_error: <route> ...``, the route
the pair had (silver, flipped or deferred). The aggregator counts each decided task as caught (the humans chose
the other side than the automatic label) or confirmed.
"""

from __future__ import annotations

REASON = "neighbour_of_error"
# Routes whose label no human and no checker decided: silver and flipped reach training on the model's word,
# deferred pairs wait for a second look.
ELIGIBLE = ("silver", "flipped", "deferred")


def automatic_side(route: str) -> str:
    """The side a route's automatic label prefers (a deferred pair's candidate label is its chosen side)."""
    return "rejected" if route == "flipped" else "chosen"


def reason(route: str, detail: str) -> str:
    return f"{REASON}: {route} {detail}"


def reviewed_route(task_reason: str | None) -> str | None:
    """The route of the pair a ``neighbour_of_error`` task is about (from its reason), None for other tasks."""
    if not task_reason or not task_reason.startswith(REASON + ": "):
        return None
    route = task_reason[len(REASON) + 2:].split(" ", 1)[0]
    return route if route in ELIGIBLE else None


def caught(task_reason: str | None, preferred: str | None) -> bool | None:
    """Whether the humans' ``preferred`` side overturned the automatic label of a neighbour_of_error task
    (None: not such a task, or a verdict for neither side)."""
    route = reviewed_route(task_reason)
    if route is None or preferred not in ("chosen", "rejected"):
        return None
    return preferred != automatic_side(route)
