"""The router: where a scored pair goes (Skywork-Reward-V2 policy; thresholds configurable).

p and gold_p are calibrated probabilities (each version's temperature, see the scorer), so the
thresholds read as how often a model at that confidence is right.

Order of the rules:
1. an objective pair a verifier can decide -> curated as verified_by_tool (flipped if the tool says
   the rejected answer is the right one);
2. both models confidently against the label (p and gold_p below flip_below) -> curated as flipped;
3. p < 0.5 (mispredicted) -> review with k = 8 similar pairs;
4. 0.5 <= p < tau (uncertain; tau of the pair's task category) -> review with k = int(8 * (1 - p));
5. confident and the gold model agrees (gold_p >= gold_agree) -> curated as silver;
6. otherwise dropped, with the reason counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_SIMILAR = 8
# A shifted tau never reaches 1: some pairs must stay confident enough to curate.
TAU_CEILING = 0.99


@dataclass(frozen=True)
class RouterPolicy:
    """The thresholds; their defaults and meaning live in WorkerSettings (tau, gold_agree, flip_below).

    ``tau_shift`` moves tau per task category (the controller sets it from audited precision,
    streams/review/tau.py); the shifted tau stays within [0.5, TAU_CEILING]."""

    tau: float
    gold_agree: float
    flip_below: float
    tau_shift: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, wsettings: Any) -> RouterPolicy:
        return cls(wsettings.tau, wsettings.gold_agree, wsettings.flip_below)

    def tau_for(self, category: str | None) -> float:
        shift = self.tau_shift.get(category or "unknown", 0.0)
        return min(TAU_CEILING, max(0.5, self.tau + shift))


@dataclass(frozen=True)
class Route:
    kind: str  # review | silver | flipped | verified_by_tool | dropped
    reason: str
    k: int = 0
    flip: bool = False


def similar_k(p: float) -> int:
    """How many similar pairs to retrieve for a review task: 8 if p < 0.5 else int(8 * (1 - p))."""
    return MAX_SIMILAR if p < 0.5 else int(MAX_SIMILAR * (1 - p))


def route(p: float, gold_p: float | None, verdict: tuple[str, str] | None, policy: RouterPolicy,
          category: str | None = None) -> Route:
    if verdict is not None:
        tool, winner = verdict
        return Route("verified_by_tool", f"{tool} verifier: {winner} is correct", flip=winner == "rejected")
    if gold_p is not None and p < policy.flip_below and gold_p < policy.flip_below:
        return Route("flipped", f"both models prefer the rejected response (p={p:.3f}, gold_p={gold_p:.3f})", flip=True)
    if p < 0.5:
        return Route("review", "mispredicted", similar_k(p))
    if p < policy.tau_for(category):
        return Route("review", "uncertain", similar_k(p))
    if gold_p is not None and gold_p >= policy.gold_agree:
        return Route("silver", "confident, gold model agrees")
    return Route("dropped", "gold_disagrees" if gold_p is not None else "no_gold_model")
