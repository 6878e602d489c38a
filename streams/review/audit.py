"""Blind audits of automatic curation.

A share of the pairs the worker curates without a human (silver: the model is confident and the gold
model agrees; flipped: both models are confident the label is wrong; verified_by_tool: a verifier
decided, on the prompt's arithmetic or on a producer's signed answer or tests) also goes to human review as a
task of its own, whose id is as opaque as any task's (task_ids.py), so an annotator cannot pick audits
out by their id. Annotators see it like any task, without the model's p or margin, so the automatic
decision cannot sway them. Its three verdicts are aggregated as usual; the
majority side is compared with the side the automatic label chose, and the count lands in Redis per
task category and kind. That measured precision is what the controller moves tau by (tau.py), and
what /metrics, `prefstream up`, the stats page and the demo report show.

An audit produces no training record: the audited pair is already curated, and a second, human copy
would count it twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from schemas.records import UNRANKED_SPLITS

KINDS = ("silver", "flipped", "verified_by_tool")
# The side of the pair as the audit task shows it that the automatic label says is better: silver and
# flipped pairs are shown as published, a verifier's pair as curated (the side the tool found right first).
EXPECTED = {"silver": "chosen", "flipped": "rejected", "verified_by_tool": "chosen"}
REASON_PREFIX = "audit:"
# Priority of audit tasks in the queue (lower first): after mispredicted pairs (p < 0.5), ahead of
# uncertain ones (p >= 0.5), so audits are answered while the stream flows.
PRIORITY = 0.5


def key(queue_prefix: str) -> str:
    """The hash '<category>|<kind>|<outcome>' -> count, outcome one of right | wrong | split."""
    return f"{queue_prefix}prefstream:agg:audit"


def shown(pair: dict[str, Any], kind: str, flip: bool) -> dict[str, Any]:
    """The pair as the audit task of ``kind`` shows it (see EXPECTED): a verifier's pair with the tool's
    winner as chosen, whichever side its producer published it on."""
    if kind == "verified_by_tool" and flip:
        return pair | {"chosen": pair["rejected"], "rejected": pair["chosen"]}
    return pair


def is_audited(pair_id: str, share: float) -> bool:
    """Whether this pair is in the audited share; decided by its id, so a batch redone after a crash
    audits the same pairs."""
    if share <= 0:
        return False
    digest = hashlib.sha256(b"audit:" + pair_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def kind_of(task: dict[str, Any]) -> str | None:
    """'silver' or 'flipped' for an audit task, None for any other task."""
    reason = task.get("reason") or ""
    if not reason.startswith(REASON_PREFIX):
        return None
    kind = reason[len(REASON_PREFIX):]
    return kind if kind in KINDS else None


def outcome(kind: str, preferred: str | None) -> str:
    """right | wrong | split: ``preferred`` is the humans' majority verdict, None when they split.

    A majority for tie or both_bad names no better side, so it neither confirms nor refutes the
    automatic label: it counts as a split, outside the precision."""
    if preferred is None or preferred in UNRANKED_SPLITS:
        return "split"
    return "right" if preferred == EXPECTED[kind] else "wrong"


def record(pipe: Any, queue_prefix: str, category: str, kind: str, preferred: str | None) -> None:
    """Count one decided audit in Redis."""
    pipe.hincrby(key(queue_prefix), f"{category}|{kind}|{outcome(kind, preferred)}", 1)


@dataclass
class AuditCount:
    right: int = 0
    wrong: int = 0
    split: int = 0

    @property
    def decided(self) -> int:
        return self.right + self.wrong

    @property
    def precision(self) -> float | None:
        """Share of audited pairs whose automatic label the human majority confirmed (splits excluded)."""
        return self.right / self.decided if self.decided else None

    def since(self, earlier: AuditCount) -> AuditCount:
        return AuditCount(self.right - earlier.right, self.wrong - earlier.wrong, self.split - earlier.split)

    def as_dict(self) -> dict[str, Any]:
        return {"right": self.right, "wrong": self.wrong, "split": self.split, "precision": self.precision}


def read(redis: Any, queue_prefix: str) -> dict[tuple[str, str], AuditCount]:
    """(category, kind) -> counts of decided audits."""
    counts: dict[tuple[str, str], AuditCount] = {}
    for field, value in redis.hgetall(key(queue_prefix)).items():
        parts = (field.decode() if isinstance(field, bytes) else field).rsplit("|", 2)
        if len(parts) != 3 or parts[2] not in ("right", "wrong", "split"):
            continue  # not ours; never let one odd field hide the others
        category, kind, outcome = parts
        count = counts.setdefault((category, kind), AuditCount())
        setattr(count, outcome, int(value))
    return counts


def summary(counts: dict[tuple[str, str], AuditCount]) -> dict[str, dict[str, dict[str, Any]]]:
    """{kind: {category | 'all': counts and precision}}: the shape /stats, `up` and the report show."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in KINDS:
        per = {cat: c for (cat, k), c in counts.items() if k == kind}
        if not per:
            continue
        total = AuditCount(sum(c.right for c in per.values()), sum(c.wrong for c in per.values()),
                           sum(c.split for c in per.values()))
        out[kind] = {"all": total.as_dict()} | {cat: c.as_dict() for cat, c in sorted(per.items())}
    return out


def headline(summary_: dict[str, dict[str, dict[str, Any]]]) -> str:
    """'silver 0.982 of 55 · flipped 0.909 of 11' (over all categories), or '-' before any audit."""
    parts = []
    for kind, per in summary_.items():
        total = per["all"]
        if total["precision"] is not None:
            parts.append(f"{kind} {total['precision']:.3f} of {total['right'] + total['wrong']}")
    return " · ".join(parts) or "-"
