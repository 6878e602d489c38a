"""tau per task category, moved by what the audits measured.

The controller (``TauTuner.step``) reads the audit counts (streams/review/audit.py) and moves a
category's tau up by ``step`` when the audited precision of its silver pairs fell below the target,
and down by ``step`` when it is comfortably above (at or above ``comfortable``), never further than
``max_shift`` from the workers' configured tau. Each move needs ``min_audits`` audits decided since
the category's last move, so one verdict cannot swing it and every move rests on fresh evidence.

What moves is a shift, not tau itself: workers add it to their own PREFSTREAM_WORKER_TAU, so the
controller need not know that setting. Shifts live in one Redis hash (category -> shift) that
workers read every few seconds; the counts at each category's last move live beside it, so a
restarted controller goes on where it stopped.

Only silver precision moves tau: a silver pair is one whose p reached tau. Flipped pairs depend on
flip_below, which stays as configured; their audited precision is reported, not acted on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from streams.review import audit
from streams.settings import ControllerSettings

log = logging.getLogger(__name__)


def shift_key(queue_prefix: str) -> str:
    return f"{queue_prefix}prefstream:tau:shift"


def state_key(queue_prefix: str) -> str:
    """category -> JSON of the silver audit counts when its shift last moved."""
    return f"{queue_prefix}prefstream:tau:at"


def read_shifts(redis: Any, queue_prefix: str) -> dict[str, float]:
    out = {}
    for field, value in redis.hgetall(shift_key(queue_prefix)).items():
        try:
            out[field.decode() if isinstance(field, bytes) else field] = float(value)
        except ValueError:
            log.warning("ignoring an unreadable tau shift %r for %r", value, field)
    return out


@dataclass(frozen=True)
class TauRule:
    """PREFSTREAM_CONTROLLER_AUDIT_TARGET, _AUDIT_COMFORTABLE, _AUDIT_MIN, _TAU_STEP and _TAU_MAX_SHIFT."""

    target: float
    comfortable: float
    min_audits: int
    step: float
    max_shift: float

    @classmethod
    def from_settings(cls, cs: ControllerSettings) -> TauRule:
        return cls(cs.audit_target, cs.audit_comfortable, cs.audit_min, cs.tau_step, cs.tau_max_shift)

    def move(self, shift: float, counts: audit.AuditCount) -> tuple[float, str] | None:
        """The new shift and why, or None to stay."""
        precision = counts.precision
        if counts.decided < self.min_audits or precision is None:
            return None
        measured = f"audited silver precision {precision:.3f} over {counts.decided} audits"
        if precision < self.target and shift < self.max_shift:
            return min(self.max_shift, shift + self.step), f"{measured} < target {self.target}"
        if precision >= self.comfortable and shift > -self.max_shift:
            return max(-self.max_shift, shift - self.step), f"{measured} >= {self.comfortable}"
        return None


class TauTuner:
    """Run by the controller each step; returns the moves it made (also logged)."""

    def __init__(self, redis: Any, queue_prefix: str, rule: TauRule) -> None:
        self.redis, self.prefix, self.rule = redis, queue_prefix, rule

    def step(self) -> list[dict[str, Any]]:
        counts = audit.read(self.redis, self.prefix)
        shifts = read_shifts(self.redis, self.prefix)
        at = {k.decode(): json.loads(v) for k, v in self.redis.hgetall(state_key(self.prefix)).items()}
        moves = []
        for (category, kind), total in sorted(counts.items()):
            if kind != "silver":
                continue
            since = total.since(audit.AuditCount(**at.get(category, {})))
            shift = shifts.get(category, 0.0)
            moved = self.rule.move(shift, since)
            if moved is None:
                continue
            new, reason = moved
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(shift_key(self.prefix), category, f"{new:.4f}")
            pipe.hset(state_key(self.prefix), category,
                      json.dumps({"right": total.right, "wrong": total.wrong, "split": total.split}))
            pipe.execute()
            move = {"category": category, "shift_from": round(shift, 4), "shift_to": round(new, 4), "reason": reason}
            log.info("tau of %s %s: shift %+.2f -> %+.2f (%s)", category,
                     "up" if new > shift else "down", shift, new, reason)
            moves.append(move)
        return moves
