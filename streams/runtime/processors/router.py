"""The router: where a scored pair goes (Skywork-Reward-V2 policy; thresholds configurable).

p and gold_p are calibrated probabilities (each version's temperature, see the scorer), so the
thresholds read as how often a model at that confidence is right.

Order of the rules:
1. an objective pair a verifier can decide -> curated as verified_by_tool (flipped if the tool says
   the rejected answer is the right one);
2. both models confidently against the label (p and gold_p below flip_below) -> curated as flipped;
3. p < 0.5 (mispredicted) -> review with k = 8 similar pairs;
4. 0.5 <= p < tau (uncertain) -> review with k = int(8 * (1 - p));
5. confident and the gold model agrees (gold_p >= gold_agree) -> curated as silver;
6. otherwise dropped, with the reason counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_SIMILAR = 8


@dataclass(frozen=True)
class RouterPolicy:
    """The thresholds; their defaults and meaning live in WorkerSettings (tau, gold_agree, flip_below)."""

    tau: float
    gold_agree: float
    flip_below: float

    @classmethod
    def from_settings(cls, wsettings: Any) -> RouterPolicy:
        return cls(wsettings.tau, wsettings.gold_agree, wsettings.flip_below)


@dataclass(frozen=True)
class Route:
    kind: str  # review | silver | flipped | verified_by_tool | dropped
    reason: str
    k: int = 0
    flip: bool = False


def similar_k(p: float) -> int:
    """How many similar pairs to retrieve for a review task: 8 if p < 0.5 else int(8 * (1 - p))."""
    return MAX_SIMILAR if p < 0.5 else int(MAX_SIMILAR * (1 - p))


def route(p: float, gold_p: float | None, verdict: tuple[str, str] | None, policy: RouterPolicy) -> Route:
    if verdict is not None:
        tool, winner = verdict
        return Route("verified_by_tool", f"{tool} verifier: {winner} is correct", flip=winner == "rejected")
    if gold_p is not None and p < policy.flip_below and gold_p < policy.flip_below:
        return Route("flipped", f"both models prefer the rejected response (p={p:.3f}, gold_p={gold_p:.3f})", flip=True)
    if p < 0.5:
        return Route("review", "mispredicted", similar_k(p))
    if p < policy.tau:
        return Route("review", "uncertain", similar_k(p))
    if gold_p is not None and gold_p >= policy.gold_agree:
        return Route("silver", "confident, gold model agrees")
    return Route("dropped", "gold_disagrees" if gold_p is not None else "no_gold_model")
