"""The aggregator: three verdicts per pair become gold data, or an expert decides.

- 3 votes, with 2 or 3 for the same side (chosen or rejected) -> VerifiedPair on prefs.verified and a
  gold CuratedPair on prefs.curated (oriented the way the humans chose; label 'flipped' if they
  preferred the original rejected response).
- A split, or a majority of tie / both_bad / invalid -> an expert ReviewTask; the expert's verdict is
  final (tie / both_bad / invalid from the expert discards the pair, with the reason recorded).
- 1 in 20 verified pairs (by pair_id hash) goes back, blind, as a re-annotation task; the answer is
  compared with the verified label to measure consistency.
- An audit task (a silver or flipped pair the worker also sent to review, audit.py) is decided by its
  three votes like any task, and the majority is counted against the automatic label; it produces no
  record.
- Rolling Krippendorff's alpha (nominal) over the last decided tasks, overall and per task
  category, from the `krippendorff` package; exported as a metric, written to Redis for the stats
  page; a warning below 0.85.
- Per task category, Gwet's AC1 over the same window, written to Redis (as 1 - AC1) for the
  labeler's controversiality. Alpha falls towards 0 when nearly every verdict is the same side,
  however often annotators agree (its chance term grows with prevalence: annotators 84-89% right
  on a run of mostly "chosen" labels get alpha 0.1-0.2, even near 0); AC1 keeps reading their
  agreement (0.7-0.75 there), and reads low agreement as low (tests/test_labeler.py).

Each batch of annotations is one Kafka transaction with its input offsets, like the worker. A task is
marked decided in Redis only after that transaction has committed (``Aggregator.committed``): until
then the decision exists only in memory, so a crash before the commit replays the batch and decides
again from the votes (stored idempotently, one per annotator), and a crash after the commit never
replays it (its offsets are committed). Either way each task gets one committed VerifiedPair; the
price of a crash right after a commit is that batch's per-annotator agreement counts (never applied).
Downstream consumers should still be idempotent on task_id: a read_committed consumer of the embedded
broker (Tansu) also sees records of aborted transactions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streams.review import audit
from streams.runtime.processors.labeler import DISAGREEMENT_KEY

log = logging.getLogger(__name__)
ALPHA_TARGET = 0.85
ALPHA_WINDOW = 500
REANNOTATE_EVERY = 20  # 5%
SIDES = ("chosen", "rejected")
VERDICTS = (*SIDES, "tie", "both_bad", "invalid")  # Annotation.preferred: the scale AC1's chance term counts


@dataclass(frozen=True)
class Decision:
    kind: str  # verified | escalate | discarded
    preferred: str | None  # chosen | rejected when verified
    agreement: float
    decided_by: str  # unanimous | majority | expert | split


def decide(votes: list[str], expert: bool = False) -> Decision:
    """The gold label from verdicts mapped to the pair (chosen/rejected/tie/both_bad/invalid)."""
    if expert:
        v = votes[-1]
        return Decision("verified" if v in SIDES else "discarded", v if v in SIDES else None, 1.0, "expert")
    top, n = Counter(votes).most_common(1)[0]
    agreement = n / len(votes)
    if n >= 2 and top in SIDES:
        return Decision("verified", top, agreement, "unanimous" if n == len(votes) else "majority")
    return Decision("escalate", None, agreement, "split")


def alpha(units: list[dict[str, str]]) -> float | None:
    """Nominal Krippendorff's alpha over units (each a mapping annotator -> preferred)."""
    import krippendorff

    raters = sorted({a for u in units for a in u})
    values = sorted({v for u in units for v in u.values()})
    if len(units) < 2:
        return None
    if len(values) < 2:
        return 1.0  # everyone always said the same thing (the package refuses a single value)
    code = {v: i for i, v in enumerate(values)}
    data = np.full((len(raters), len(units)), np.nan)
    for j, u in enumerate(units):
        for a, v in u.items():
            data[raters.index(a), j] = code[v]
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def ac1(units: list[dict[str, str]], scale: tuple[str, ...] = VERDICTS) -> float | None:
    """Gwet's AC1 over units (each a mapping annotator -> preferred), any number of raters per unit.

    Observed agreement: the share of agreeing rater pairs within a unit, averaged over units with
    two or more ratings. Chance agreement: sum of pi_k (1 - pi_k) / (Q - 1), with pi_k the mean
    share of ratings in category k and Q the categories of ``scale``; it shrinks as one category
    dominates, so agreement on a skewed run is not read as chance (Gwet 2008).
    """
    rated = [Counter(u.values()) for u in units if len(u) >= 2]
    if len(rated) < 2:
        return None
    observed = float(np.mean([sum(r * (r - 1) for r in c.values()) / (n * (n - 1))
                              for c in rated for n in [sum(c.values())]]))
    pi = {k: float(np.mean([c[k] / sum(c.values()) for c in rated])) for k in scale}
    chance = sum(p * (1 - p) for p in pi.values()) / (len(scale) - 1)
    return (observed - chance) / (1 - chance)


def needs_reannotation(pair_id: str) -> bool:
    return int(hashlib.sha256(pair_id.encode()).hexdigest(), 16) % REANNOTATE_EVERY == 0


def votes_key(queue_prefix: str, task_id: str) -> str:
    return f"{queue_prefix}prefstream:agg:votes:{task_id}"


def expert_task_id(pair_id: str) -> str:
    return f"{pair_id}:expert"


def final_key(queue_prefix: str) -> str:
    """The hash pair_id -> the verified side (chosen | rejected, of the pair as its review task showed it)."""
    return f"{queue_prefix}prefstream:agg:final"


def restore_vote(redis: Any, queue_prefix: str, ann: dict[str, Any]) -> None:
    """Rebuild path (feeder): a vote read back from prefs.annotations, so a task whose votes were in a
    wiped Redis still decides when its remaining verdicts arrive."""
    if not ann.get("reannotation"):
        redis.hsetnx(votes_key(queue_prefix, ann["task_id"]), ann["annotator"], ann["preferred"])


class Aggregator:
    """Per-annotation logic on Redis state; returns the records to produce.

    ``handle`` records votes (idempotent) and returns outputs; what follows from a decision (the
    decided mark, per-annotator agreement, the alpha window) waits in ``_after_commit`` until the
    caller's transaction commits (``committed``) or is dropped with the batch (``abandoned``).
    """

    def __init__(self, redis: Any, queue_prefix: str, retention_s: int = 7 * 24 * 3600) -> None:
        self.redis = redis
        self.queue_prefix = queue_prefix
        self.prefix = f"{queue_prefix}prefstream:agg:"
        self.qp = f"{queue_prefix}prefstream:review:"
        self.retention_s = retention_s
        self.window: deque[tuple[str, dict[str, str]]] = deque(maxlen=ALPHA_WINDOW)
        self._after_commit: dict[str, Callable[[Any], None]] = {}  # task id -> its Redis writes
        self._window_pending: list[tuple[str, dict[str, str]]] = []

    def committed(self) -> None:
        """The batch's transaction committed: mark its tasks decided, in one MULTI with their stats."""
        if self._after_commit:
            pipe = self.redis.pipeline(transaction=True)
            for tid, effect in self._after_commit.items():
                pipe.set(self.prefix + "decided:" + tid, "1", ex=self.retention_s)
                pipe.expire(votes_key(self.queue_prefix, tid), self.retention_s)
                effect(pipe)
            pipe.execute()
        if self._window_pending:
            self.window.extend(self._window_pending)
            self._update_alpha()
        self.abandoned()

    def abandoned(self) -> None:
        """The batch will be redone (aborted transaction or crash): forget its decisions."""
        self._after_commit.clear()
        self._window_pending.clear()

    def _task(self, tid: str) -> dict | None:
        raw = self.redis.get(f"{self.qp}task:{tid}")
        return json.loads(raw) if raw else None

    def handle(self, ann: dict[str, Any], task: dict[str, Any] | None = None) -> list[tuple[str, str, dict]]:
        """(topic name, schema, record) outputs for one Annotation."""
        task = task or self._task(ann["task_id"])
        if task is None:
            log.warning("annotation for unknown task %s ignored", ann["task_id"])
            return []
        pair_id = task["pair"]["pair_id"]
        if ann.get("reannotation"):
            final = self.redis.hget(final_key(self.queue_prefix), pair_id)
            if final is not None:
                self.redis.hincrby(self.prefix + "consistency", "same" if final.decode() == ann["preferred"] else "different", 1)
            return []
        tid = ann["task_id"]
        key = votes_key(self.queue_prefix, tid)
        self.redis.hsetnx(key, ann["annotator"], ann["preferred"])
        votes = {k.decode(): v.decode() for k, v in self.redis.hgetall(key).items()}
        if not ann.get("expert") and len(votes) < 3:
            return []
        if tid in self._after_commit or self.redis.exists(self.prefix + "decided:" + tid):
            return []  # decided in this batch already, or committed before (a replayed annotation)
        d = decide([ann["preferred"]] if ann.get("expert") else list(votes.values()), expert=bool(ann.get("expert")))
        category = task["pair"].get("task_category") or "unknown"
        if not ann.get("expert"):
            self._window_pending.append((category, votes))
        if (kind := audit.kind_of(task)) is not None:
            # An audit measures the automatic label and is never escalated; a split counts as such.
            preferred = d.preferred if d.kind == "verified" else None
            self._after_commit[tid] = lambda pipe: audit.record(pipe, self.queue_prefix, category, kind, preferred)
            return []
        self._after_commit[tid] = self._effects(d, ann, pair_id, votes)
        now = int(time.time() * 1000)
        if d.kind == "escalate":
            expert_task = dict(task, task_id=expert_task_id(pair_id), expert=True, reason="escalated", created_at=now)
            return [("prefs.review", "ReviewTask", expert_task)]
        if d.kind == "discarded":
            return []
        pair = dict(task["pair"])
        label = "kept"
        if d.preferred == "rejected":
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
            label = "flipped"
        pair["label_source"] = "human"
        rationale = "; ".join(filter(None, [ann.get("rationale")]))
        out = [
            ("prefs.verified", "VerifiedPair", {"pair": pair, "label": label, "agreement": d.agreement,
                                                "annotators": list(votes) if not ann.get("expert") else [ann["annotator"]],
                                                "decided_by": d.decided_by, "rationale": rationale or None,
                                                "verified_at": now}),
            ("prefs.curated", "CuratedPair", {"pair": pair, "split": "gold", "p": None, "model_version": None,
                                              "reason": f"human {d.decided_by} ({d.agreement:.2f})", "curated_at": now}),
        ]
        if needs_reannotation(pair_id) and not ann.get("expert"):
            out.append(("prefs.review", "ReviewTask", dict(task, task_id=f"{pair_id}:re", reason="reannotation",
                                                            priority=1.0, created_at=now)))
        return out

    def _effects(self, d: Decision, ann: dict[str, Any], pair_id: str, votes: dict[str, str]) -> Callable[[Any], None]:
        """The Redis writes a decision implies, applied (on a MULTI pipeline) once its batch committed."""
        def apply(pipe: Any) -> None:
            if d.kind == "verified" and not ann.get("expert"):  # per-annotator agreement with the decided label
                for who, v in votes.items():
                    pipe.hincrby(self.qp + "stats:agree", who, int(v == d.preferred))
                    pipe.hincrby(self.qp + "stats:decided", who, 1)
            if d.kind == "verified":
                pipe.hset(final_key(self.queue_prefix), pair_id, d.preferred)
            if d.kind == "discarded":
                pipe.hincrby(self.prefix + "discarded", ann["preferred"], 1)
        return apply

    def _update_alpha(self) -> None:
        from streams.runtime import metrics

        overall = alpha([v for _, v in self.window])
        if overall is None:
            return
        self.redis.set(self.qp + "alpha:overall", f"{overall:.4f}")
        metrics.ALPHA.labels("overall").set(overall)
        by_cat: dict[str, list[dict[str, str]]] = {}
        for cat, v in self.window:
            by_cat.setdefault(cat, []).append(v)
        for cat, units in by_cat.items():
            a = alpha(units)
            if a is not None:
                metrics.ALPHA.labels(cat).set(a)
            agreement = ac1(units)
            if agreement is not None:
                self.redis.hset(DISAGREEMENT_KEY, cat, f"{max(0.0, min(1.0, 1 - agreement)):.4f}")
        if overall < ALPHA_TARGET:
            log.warning("annotator agreement is low: Krippendorff's alpha %.3f < %.2f over %d tasks",
                        overall, ALPHA_TARGET, len(self.window))


def run(settings: Any, redis_client: Any, stop: Any, max_batch: int = 64, retention_s: int = 7 * 24 * 3600,
        fault: Callable[[str], None] | None = None) -> None:
    """Consume prefs.annotations; each batch's outputs and offsets commit in one transaction.

    ``fault`` (tests only) is called with "batch" (a batch read, the queue found built, nothing handled),
    "handled" (votes in Redis, nothing committed) and "committed" (transaction committed, tasks not yet
    marked decided); raising there is a crash.
    """
    from confluent_kafka import Consumer

    from schemas.wire import ValueCodec
    from streams.kafka import topics
    from streams.kafka.config import consumer_config
    from streams.kafka.transactions import RETRY_BACKOFF_S, BatchTransactions, rewind
    from streams.review.queue import until_redis_answers

    agg = Aggregator(redis_client, settings.topic_prefix, retention_s)
    marker = agg.qp + "initialized"  # set by the feeder once the queue is (re)built
    codec = ValueCodec(settings.schema_registry_url)
    group = f"{settings.topic_prefix}prefstream-aggregator"
    txn = BatchTransactions(settings, group, stop=stop)
    consumer = Consumer(consumer_config(settings, group))
    consumer.subscribe([settings.topic(topics.ANNOTATIONS)])
    try:
        while not stop.is_set():
            txn.poll()
            msgs = [m for m in consumer.consume(max_batch, 0.5) if not m.error()]
            if not msgs:
                continue
            # The marker holds the token of the rebuild that filled this Redis. Read before and after the
            # batch: a Redis wiped (and perhaps rebuilt) in between may have answered some handles with no
            # task or too few votes, which would drop those verdicts, so the batch is redone instead.
            built = until_redis_answers(lambda: redis_client.get(marker), stop, "aggregating verdicts")
            if not built:
                # Redis is new or was wiped: the feeder is restoring tasks and votes from the topics.
                log.info("waiting for the review queue to be rebuilt before aggregating")
                rewind(consumer, stop)
                time.sleep(1)
                continue
            if fault:
                fault("batch")
            outputs = []
            for m in msgs:
                try:
                    ann = codec.decode("Annotation", m.value(), m.headers())
                except Exception as exc:  # written by our own app; an unreadable one is logged, not fatal
                    log.error("unreadable Annotation at offset %s: %s", m.offset(), exc)
                    continue
                handled = until_redis_answers(lambda ann=ann: agg.handle(ann), stop, "aggregating verdicts")
                outputs.extend(handled or [])
            if stop.is_set():  # stopped while Redis was away: some verdicts were not handled, so no commit
                break
            if until_redis_answers(lambda: redis_client.get(marker), stop, "aggregating verdicts") != built:
                log.warning("Redis was emptied while a batch of verdicts was aggregated; redoing the batch")
                agg.abandoned()
                rewind(consumer, stop)
                continue
            encoded = []
            for name, schema, rec in outputs:
                topic = settings.topic(name)
                value, headers = codec.encode(schema, rec, topic)
                encoded.append((topic, rec.get("task_id", rec["pair"]["pair_id"]).encode(), value, headers))
            if fault:
                fault("handled")
            if not txn.commit(consumer, encoded, msgs):  # recovered and rewound: the batch comes again
                agg.abandoned()
                time.sleep(RETRY_BACKOFF_S)
                continue
            if fault:
                fault("committed")
            until_redis_answers(agg.committed, stop, "marking decided tasks")
    finally:
        consumer.close()
