"""Error-driven expansion, the decision: which neighbours of a pair the humans corrected go to review.

A human verdict corrects the model when the model gave the side the humans chose p < 0.5. The model was then
confidently wrong near that pair's prompt, so its confidence on the pair's k = 8 nearest neighbours counts for
less. Each neighbour whose label no human decided (silver, flipped or deferred) is looked at again: its p by the
serving model is pulled towards 0.5 by the nearby error,

    guided p = 0.5 + (p - 0.5) * (1 - similarity * error)

where ``p`` is the model's probability for the neighbour's automatic label (1 - p for a flipped pair),
``similarity`` its cosine similarity to the corrected pair, and ``error`` the nearest-neighbour vote of the
verified pairs: their similarity-weighted mean of 1 - p(human side), the corrected pair counted at similarity 1
beside the verified pairs among its neighbours. A lone mistake among verified pairs the model got right weighs
less than a region where it was wrong each time. A neighbour whose guided p is below its category's tau (now
uncertain) or below 0.5 (now wrong) goes to review with reason ``neighbour_of_error``, within the review budget.

Pairs already sent to review, decided by a checker (verified_by_tool), dropped (never trained on) or decided by
humans are not looked at again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streams.review.neighbour_tasks import ELIGIBLE, REASON, automatic_side, reason
from streams.runtime.processors.router import Route, similar_k

__all__ = ["ELIGIBLE", "REASON", "Evidence", "error_vote", "guided_label_p", "guided_p", "is_correction", "look_again",
           "side_p"]


@dataclass(frozen=True)
class Evidence:
    """One verified pair near the corrected one: how similar, and how wrong the model was on it (0..1)."""

    similarity: float
    error: float


def side_p(p: float, human_side: str) -> float:
    """The model's probability for the side the humans chose (``chosen`` or ``rejected`` of the pair as scored)."""
    return p if human_side == "chosen" else 1 - p


def is_correction(p: float, human_side: str) -> bool:
    """Whether a verdict for ``human_side`` corrects a model that gave the pair's chosen side ``p``."""
    return side_p(p, human_side) < 0.5


def error_vote(evidence: Sequence[Evidence]) -> float:
    """The similarity-weighted mean error of the model on the verified pairs of ``evidence`` (0 when none)."""
    weights = [max(0.0, e.similarity) for e in evidence]
    total = sum(weights)
    return sum(w * e.error for w, e in zip(weights, evidence, strict=True)) / total if total else 0.0


def guided_p(p_label: float, similarity: float, error: float) -> float:
    """The model's p for a label, pulled towards 0.5 by an error ``error`` at ``similarity`` (both clamped to 0..1)."""
    pull = min(1.0, max(0.0, similarity)) * min(1.0, max(0.0, error))
    return 0.5 + (p_label - 0.5) * (1 - pull)


def guided_label_p(route: str, p: float, similarity: float, error: float) -> float:
    """The guided p of a neighbour's automatic label (``route``; ``p``: the serving model's for its chosen side)."""
    return guided_p(side_p(p, automatic_side(route)), similarity, error)


def look_again(route: str, p: float, similarity: float, error: float, tau: float, corrected_id: str) -> Route | None:
    """The review Route of a neighbour (``route``, the serving model's ``p`` for its chosen side) of the pair
    ``corrected_id``, or None when it still looks right (or is not a pair to look at again)."""
    if route not in ELIGIBLE:
        return None
    p_label = side_p(p, automatic_side(route))
    guided = guided_label_p(route, p, similarity, error)
    if guided >= tau:
        return None
    why = "now looks wrong" if guided < 0.5 else "now uncertain"
    return Route("review", reason(route, f"{why} (guided p={guided:.3f}, p={p_label:.3f}, similarity "
                                         f"{similarity:.2f} to the corrected {corrected_id})"), similar_k(guided))
