"""The aggregator: three verdicts per pair become gold data, or an expert decides.

- 3 votes, with 2 or 3 for the same side (chosen or rejected) -> VerifiedPair on prefs.verified and a
  gold CuratedPair on prefs.curated (oriented the way the humans chose; label 'flipped' if they
  preferred the original rejected response). Its strength is the median of the strengths the
  majority's votes gave (``combined_strength``), which a retrain turns into a Bradley-Terry margin.
- 2 or 3 votes for tie, or for both_bad -> decided as such: a VerifiedPair labelled tie / both_bad
  and a CuratedPair of split tie / both_bad (the pair as the task showed it), kept in the shards
  with that verdict; no retrain reads those splits, so they never enter the Bradley-Terry loss.
- A split, or a majority of invalid -> an expert ReviewTask; the expert's verdict is final (a side,
  tie or both_bad as above, with the expert's own strength; invalid discards the pair, counted).
- 1 in 20 verified pairs (by pair_id hash) goes back, blind, as a re-annotation task; the answer is
  compared with the verified label to measure consistency.
- An audit task (a silver, flipped or verified_by_tool pair the worker also sent to review, audit.py) is decided by its
  three votes like any task, and the majority is counted against the automatic label; it produces no
  record.
- Rolling Krippendorff's alpha (nominal) over the last decided tasks, overall and per task
  category, from the `krippendorff` package; exported as a metric, written to Redis for the stats
  page; a warning below 0.85. The window itself is a Redis list, appended in the same MULTI that
  marks its tasks decided, so a restarted aggregator goes on from the same window.
- The re-annotation answers are counted against the verified label (``consistency``): the stats
  page, /metrics and the demo report show the share that agreed.
- Per task category, Gwet's AC1 over the same window, written to Redis (as 1 - AC1) for the
  labeler's controversiality. Alpha falls towards 0 when nearly every verdict is the same side,
  however often annotators agree (its chance term grows with prevalence: annotators 84-89% right
  on a run of mostly "chosen" labels get alpha 0.1-0.2, even near 0); AC1 keeps reading their
  agreement (0.7-0.75 there), and reads low agreement as low (tests/test_labeler.py).

Each batch of annotations is one Kafka transaction with its input offsets, like the worker. A task is
marked decided in Redis only after that transaction has committed (``Aggregator.committed``), so a
crash before the commit replays the batch and decides again from the votes (stored idempotently, one
per annotator). Just before the commit each decision is noted in Redis with the annotation that made
it (``Aggregator.intend``); after a crash between the commit and the decided mark, the batch is not
replayed (its offsets are committed), and a later vote on the task finds the note, sees that the
group's committed offset has passed that annotation, and only applies the decision's Redis side (the
decided mark, agreement counts, the audit count) from the noted votes: no second VerifiedPair. So each
task is decided once across crashes. Downstream consumers should still be idempotent on task_id: a
read_committed consumer of the embedded broker (Tansu) also sees records of aborted transactions. An
annotation that does not decode goes to prefs.dlq with its reason, in the batch's transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np

from schemas.records import STRENGTHS, UNRANKED_SPLITS
from streams.exceptions import SignatureError
from streams.review import audit, neighbour_tasks, provenance, task_ids
from streams.review.disagreement import DISAGREEMENT_KEY
from streams.review.task_ids import TaskIds

log = logging.getLogger(__name__)
ALPHA_TARGET = 0.85
ALPHA_WINDOW = 500
REANNOTATE_EVERY = 20  # 5%
SIDES = ("chosen", "rejected")
DECIDABLE = (*SIDES, *UNRANKED_SPLITS)  # what a majority or an expert can decide a task as
VERDICTS = (*DECIDABLE, "invalid")  # Annotation.preferred: the scale AC1's chance term counts


@dataclass(frozen=True)
class Decision:
    kind: str  # verified | escalate | discarded
    preferred: str | None  # chosen | rejected | tie | both_bad when verified
    agreement: float
    decided_by: str  # unanimous | majority | expert | split


def decide(votes: list[str], expert: bool = False) -> Decision:
    """The gold label from verdicts mapped to the pair (chosen/rejected/tie/both_bad/invalid)."""
    if expert:
        v = votes[-1]
        return Decision("verified" if v in DECIDABLE else "discarded", v if v in DECIDABLE else None, 1.0, "expert")
    top, n = Counter(votes).most_common(1)[0]
    agreement = n / len(votes)
    if n >= 2 and top in DECIDABLE:
        return Decision("verified", top, agreement, "unanimous" if n == len(votes) else "majority")
    return Decision("escalate", None, agreement, "split")


def combined_strength(strengths: list[str | None]) -> str | None:
    """The median of the strengths given (on the STRENGTHS scale), None when none was.

    Of an even count the lower middle one: a strength is claimed only where at least half of the votes
    that rated it hold it, so one "much" beside one "slightly" is "slightly"."""
    ranks = sorted(STRENGTHS.index(s) for s in strengths if s in STRENGTHS)
    return STRENGTHS[ranks[(len(ranks) - 1) // 2]] if ranks else None


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


def window_key(queue_prefix: str) -> str:
    """The list of the alpha window's units, oldest first: JSON [task category, {annotator: verdict}]."""
    return f"{queue_prefix}prefstream:review:alpha:window"


def alpha_by_category_key(queue_prefix: str) -> str:
    """The hash task category -> rolling alpha over the window's units of that category."""
    return f"{queue_prefix}prefstream:review:alpha:by_category"


def consistency_key(queue_prefix: str) -> str:
    """The hash "<pair_id>:<annotator>" -> same | different: each blind re-annotation against the verified label."""
    return f"{queue_prefix}prefstream:agg:consistency:answers"


def consistency_counts_key(queue_prefix: str) -> str:
    """The hash same | different -> how many of the answers in ``consistency_key`` say so."""
    return f"{queue_prefix}prefstream:agg:consistency:counts"


# KEYS: consistency_key, consistency_counts_key. ARGV: "<pair_id>:<annotator>", same | different. An answer
# is counted once, however often its batch is replayed.
_COUNT_ANSWER = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
return 1
"""


def consistency(redis: Any, queue_prefix: str) -> dict[str, Any]:
    """Blind re-annotations against the verified label: how many agreed, differed, and the share that agreed."""
    got = {k.decode(): int(v) for k, v in redis.hgetall(consistency_counts_key(queue_prefix)).items()}
    same, different = got.get("same", 0), got.get("different", 0)
    return {"same": same, "different": different,
            "agreement": same / (same + different) if same + different else None}


def votes_key(queue_prefix: str, task_id: str) -> str:
    return f"{queue_prefix}prefstream:agg:votes:{task_id}"


def strengths_key(queue_prefix: str, task_id: str) -> str:
    """The hash annotator -> strength of the votes on a task that gave one (beside ``votes_key``)."""
    return f"{queue_prefix}prefstream:agg:strengths:{task_id}"


def final_key(queue_prefix: str) -> str:
    """The hash pair_id -> the verified side (chosen | rejected, of the pair as its review task showed it)."""
    return f"{queue_prefix}prefstream:agg:final"


def restore_vote(redis: Any, queue_prefix: str, ann: dict[str, Any]) -> None:
    """Rebuild path (feeder): a vote read back from prefs.annotations, so a task whose votes were in a
    wiped Redis still decides when its remaining verdicts arrive."""
    if not ann.get("reannotation"):
        redis.hsetnx(votes_key(queue_prefix, ann["task_id"]), ann["annotator"], ann["preferred"])
        if ann.get("strength"):
            redis.hsetnx(strengths_key(queue_prefix, ann["task_id"]), ann["annotator"], ann["strength"])


class Aggregator:
    """Per-annotation logic on Redis state; returns the records to produce.

    ``handle`` records votes (idempotent) and returns outputs; what follows from a decision (the
    decided mark, per-annotator agreement, the alpha window) waits in ``_after_commit`` until the
    caller's transaction commits (``committed``) or is dropped with the batch (``abandoned``).
    """

    def __init__(self, redis: Any, queue_prefix: str, retention_s: int = 7 * 24 * 3600,
                 committed_offset: Callable[[str, int], int] | None = None) -> None:
        self.redis = redis
        self.queue_prefix = queue_prefix
        self.task_ids = TaskIds(redis, queue_prefix)
        # The consumer group's committed offset of a partition (run() asks the broker): whether the
        # transaction of a decision noted by ``intend`` committed. None: intents are not consulted.
        self.committed_offset = committed_offset
        self._intents: dict[str, dict[str, Any]] = {}  # task id -> what ``intend`` writes for it
        self.prefix = f"{queue_prefix}prefstream:agg:"
        self.qp = f"{queue_prefix}prefstream:review:"
        self.retention_s = retention_s
        self.window: deque[tuple[str, dict[str, str]]] = deque(
            (tuple(json.loads(raw)) for raw in redis.lrange(window_key(queue_prefix), -ALPHA_WINDOW, -1)),
            maxlen=ALPHA_WINDOW)
        self._after_commit: dict[str, Callable[[Any], None]] = {}  # task id -> its Redis writes
        self._window_pending: list[tuple[str, dict[str, str]]] = []

    def committed(self) -> None:
        """The batch's transaction committed: mark its tasks decided, in one MULTI with their stats."""
        if self._after_commit:
            pipe = self.redis.pipeline(transaction=True)
            for tid, effect in self._after_commit.items():
                pipe.set(self.prefix + "decided:" + tid, "1", ex=self.retention_s)
                pipe.delete(self.prefix + "deciding:" + tid)
                pipe.expire(votes_key(self.queue_prefix, tid), self.retention_s)
                pipe.expire(strengths_key(self.queue_prefix, tid), self.retention_s)
                effect(pipe)
            if self._window_pending:
                pipe.rpush(window_key(self.queue_prefix), *(json.dumps(unit) for unit in self._window_pending))
                pipe.ltrim(window_key(self.queue_prefix), -ALPHA_WINDOW, -1)
            pipe.execute()
        if self._window_pending:
            self.window.extend(self._window_pending)
            self._update_alpha()
        self.abandoned()

    def abandoned(self) -> None:
        """The batch will be redone (aborted transaction or crash): forget its decisions."""
        self._after_commit.clear()
        self._window_pending.clear()
        self._intents.clear()

    def intend(self) -> None:
        """Just before the batch's transaction commits: note, for each task it decides, the annotation that
        decided it (topic, partition, offset) and the votes it was decided from. A crash after the commit
        but before ``committed`` then leaves a note whose annotation the group's committed offset has
        passed, and ``handle`` knows the decision is out and never makes it again (``_settled``)."""
        if self._intents:
            pipe = self.redis.pipeline(transaction=False)
            for tid, intent in self._intents.items():
                pipe.set(self.prefix + "deciding:" + tid, json.dumps(intent), ex=self.retention_s)
            pipe.execute()

    def _settled(self, tid: str) -> dict[str, Any] | None:
        """The note ``intend`` left for a decision whose transaction committed, or None (no note, or its
        transaction never committed: the batch was redone, or is being redone now)."""
        if self.committed_offset is None:
            return None
        raw = self.redis.get(self.prefix + "deciding:" + tid)
        if raw is None:
            return None
        intent = json.loads(raw)
        topic, partition, offset = intent["source"]
        return intent if self.committed_offset(topic, partition) > offset else None

    def _task(self, tid: str) -> dict | None:
        raw = self.redis.get(f"{self.qp}task:{tid}")
        return json.loads(raw) if raw else None

    def handle(self, ann: dict[str, Any], task: dict[str, Any] | None = None,
               source: tuple[str, int, int] | None = None) -> list[tuple[str, str, dict]]:
        """(topic name, schema, record) outputs for one Annotation, read at ``source`` (topic, partition, offset)."""
        task = task or self._task(ann["task_id"])
        if task is None:
            log.warning("annotation for unknown task %s ignored", ann["task_id"])
            return []
        pair_id = task["pair"]["pair_id"]
        if ann.get("reannotation"):
            final = self.redis.hget(final_key(self.queue_prefix), pair_id)
            if final is not None:  # one answer per (pair, annotator), so a replayed batch does not count twice
                self.redis.eval(_COUNT_ANSWER, 2, consistency_key(self.queue_prefix),
                                consistency_counts_key(self.queue_prefix), f"{pair_id}:{ann['annotator']}",
                                "same" if final.decode() == ann["preferred"] else "different")
                agreed = consistency(self.redis, self.queue_prefix)["agreement"]
                if agreed is not None:
                    from streams.review import metrics

                    metrics.REANNOTATION_AGREEMENT.set(agreed)
            return []
        tid = ann["task_id"]
        key = votes_key(self.queue_prefix, tid)
        self.redis.hsetnx(key, ann["annotator"], ann["preferred"])
        if ann.get("strength"):
            if ann["strength"] not in STRENGTHS:  # the app admits only these; another producer's is not counted
                log.warning("annotation %s has strength %r, not one of %s; counted without it",
                            ann.get("annotation_id"), ann["strength"], ", ".join(STRENGTHS))
            self.redis.hsetnx(strengths_key(self.queue_prefix, tid), ann["annotator"], ann["strength"])
        votes = {k.decode(): v.decode() for k, v in self.redis.hgetall(key).items()}
        if not ann.get("expert") and len(votes) < 3:
            return []
        if tid in self._after_commit or self.redis.exists(self.prefix + "decided:" + tid):
            return []  # decided in this batch already, or committed before (a replayed annotation)
        settled = self._settled(tid)
        if settled is not None:  # committed before a crash lost its decided mark: redo only the Redis side
            votes = settled["votes"]
            ann = ann | {k: settled[k] for k in ("annotator", "preferred", "expert")}
        elif source is not None:
            self._intents[tid] = {"source": list(source), "votes": votes, "annotator": ann["annotator"],
                                  "preferred": ann["preferred"], "expert": bool(ann.get("expert"))}
        d = decide([ann["preferred"]] if ann.get("expert") else list(votes.values()), expert=bool(ann.get("expert")))
        category = task["pair"].get("task_category") or "unknown"
        if not ann.get("expert"):
            self._window_pending.append((category, votes))
        if (kind := audit.kind_of(task)) is not None:
            # An audit measures the automatic label and is never escalated; a split counts as such, and so
            # does a tie or both_bad majority (audit.outcome).
            preferred = d.preferred if d.kind == "verified" else None
            self._after_commit[tid] = lambda pipe: audit.record(pipe, self.queue_prefix, category, kind, preferred)
            return []
        self._after_commit[tid] = self._effects(d, ann, pair_id, votes, task.get("reason"))
        if settled is not None:
            return []  # its records are in Kafka already
        now = int(time.time() * 1000)
        if d.kind == "escalate":
            expert_task = dict(task, task_id=self.task_ids.of(pair_id, task_ids.EXPERT), expert=True, reason="escalated",
                               created_at=now)
            return [("prefs.review", "ReviewTask", expert_task)]
        if d.kind == "discarded":
            return []
        pair = dict(task["pair"])
        label, split, strength = "kept", "gold", None
        if d.preferred in UNRANKED_SPLITS:  # kept as the task showed it, with the verdict as its split
            label = split = d.preferred
        else:
            given = {k.decode(): v.decode() for k, v in self.redis.hgetall(strengths_key(self.queue_prefix, tid)).items()}
            winners = [ann["annotator"]] if ann.get("expert") else [who for who, v in votes.items() if v == d.preferred]
            strength = combined_strength([given.get(who) for who in winners])
        if d.preferred == "rejected":
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
            label = "flipped"
        pair["label_source"] = "human"
        rationale = "; ".join(filter(None, [ann.get("rationale")]))
        out: list[tuple[str, str, dict[str, Any]]] = [
            ("prefs.verified", "VerifiedPair", {"pair": pair, "label": label, "agreement": d.agreement,
                                                "annotators": list(votes) if not ann.get("expert") else [ann["annotator"]],
                                                "decided_by": d.decided_by, "strength": strength,
                                                "rationale": rationale or None, "verified_at": now}),
            ("prefs.curated", "CuratedPair", {"pair": pair, "split": split, "p": None, "model_version": None,
                                              "reason": f"human {d.decided_by} ({d.agreement:.2f})",
                                              "strength": strength, "curated_at": now}),
        ]
        if needs_reannotation(pair_id) and not ann.get("expert"):
            out.append(("prefs.review", "ReviewTask", dict(task, task_id=self.task_ids.of(pair_id, task_ids.REANNOTATION),
                                                            reason="reannotation", priority=1.0, created_at=now)))
        return out

    def _effects(self, d: Decision, ann: dict[str, Any], pair_id: str, votes: dict[str, str],
                 reason: str | None = None) -> Callable[[Any], None]:
        """The Redis writes a decision implies, applied (on a MULTI pipeline) once its batch committed; and the
        count of a neighbour_of_error task's outcome (review/neighbour_tasks.py)."""
        def apply(pipe: Any) -> None:
            if d.kind == "verified" and (hit := neighbour_tasks.caught(reason, d.preferred)) is not None:
                from streams.review import metrics

                counter = metrics.EXPANSION_CAUGHT if hit else metrics.EXPANSION_CONFIRMED
                counter.labels(neighbour_tasks.reviewed_route(reason)).inc()
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
        from streams.review import metrics

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
                self.redis.hset(alpha_by_category_key(self.queue_prefix), cat, f"{a:.4f}")
            agreement = ac1(units)
            if agreement is not None:
                self.redis.hset(DISAGREEMENT_KEY, cat, f"{max(0.0, min(1.0, 1 - agreement)):.4f}")
        if overall < ALPHA_TARGET:
            log.warning("annotator agreement is low: Krippendorff's alpha %.3f < %.2f over %d tasks",
                        overall, ALPHA_TARGET, len(self.window))


def run(settings: Any, redis_client: Any, stop: Any, max_batch: int = 64, retention_s: int = 7 * 24 * 3600,
        fault: Callable[[str], None] | None = None, keys: provenance.AnnotationKeys | None = None) -> None:
    """Consume prefs.annotations; each batch's outputs and offsets commit in one transaction.

    ``fault`` (tests only) is called with "batch" (a batch read, the queue found built, nothing handled),
    "handled" (votes in Redis, nothing committed) and "committed" (transaction committed, tasks not yet
    marked decided); raising there is a crash.

    An annotation that does not decode, or that the review app did not sign (``keys``, by default the
    app's own from its settings: review/provenance.py), goes to prefs.dlq with the reason, in the batch's
    transaction.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from schemas.wire import ValueCodec
    from streams.kafka import topics
    from streams.kafka.config import consumer_config
    from streams.kafka.transactions import RETRY_BACKOFF_S, BatchTransactions, rewind
    from streams.keys import review_keys
    from streams.review.queue import until_redis_answers
    from streams.settings import ReviewSettings

    codec = ValueCodec(settings.schema_registry_url)
    keys = keys or provenance.AnnotationKeys(review_keys(settings, ReviewSettings()))
    group = f"{settings.topic_prefix}prefstream-aggregator"
    # Its outputs are marked, so that readers drop those of a batch that did not commit (kafka/committed.py).
    txn = BatchTransactions(settings, group, stop=stop, marked=[settings.topic(t) for t in (
        topics.VERIFIED, topics.CURATED, topics.REVIEW, topics.DLQ)])
    consumer = Consumer(consumer_config(settings, group))

    def committed_offset(topic: str, partition: int) -> int:
        """The group's committed offset (negative when none), asked until the broker answers."""
        while True:
            try:
                return consumer.committed([TopicPartition(topic, partition)], timeout=10)[0].offset
            except KafkaException as exc:
                if stop.is_set():
                    return -1  # no answer: taken as not committed; the stopping loop commits nothing more
                log.warning("cannot read the aggregator's committed offsets (%s); retrying in %.0f s",
                            exc.args[0].str(), RETRY_BACKOFF_S)
                time.sleep(RETRY_BACKOFF_S)

    agg = Aggregator(redis_client, settings.topic_prefix, retention_s, committed_offset)
    marker = agg.qp + "initialized"  # set by the feeder once the queue is (re)built
    consumer.subscribe([settings.topic(topics.ANNOTATIONS)])
    try:
        while not stop.is_set():
            txn.poll()
            msgs = [m for m in consumer.consume(max_batch, 0.5) if not m.error()]
            if not msgs:
                txn.anchor(consumer)  # idle: lets readers decide the last batch's outputs
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
            outputs, dead = [], []
            for m in msgs:
                try:
                    ann = codec.decode("Annotation", m.value(), m.headers())
                except Exception as exc:  # any decoder error is this record's: it is dead-lettered, never skipped
                    dead.append(dead_letter(settings, codec, m, exc))
                    continue
                if (refused := keys.check(ann, m.headers())) is not None:  # not the review app's: it proves nothing
                    dead.append(dead_letter(settings, codec, m, SignatureError(provenance.detail(refused, ann), refused)))
                    continue
                # confluent-kafka types these Optional (a Message made by hand); a consumed one has all three.
                source = cast(tuple[str, int, int], (m.topic(), m.partition(), m.offset()))
                handled = until_redis_answers(partial(agg.handle, ann, source=source), stop,
                                              "aggregating verdicts")
                outputs.extend(handled or [])
            if stop.is_set():  # stopped while Redis was away: some verdicts were not handled, so no commit
                break
            if until_redis_answers(lambda: redis_client.get(marker), stop, "aggregating verdicts") != built:
                log.warning("Redis was emptied while a batch of verdicts was aggregated; redoing the batch")
                agg.abandoned()
                rewind(consumer, stop)
                continue
            encoded = dead
            for name, schema, rec in outputs:
                topic = settings.topic(name)
                value, headers = codec.encode(schema, rec, topic)
                encoded.append((topic, rec.get("task_id", rec["pair"]["pair_id"]).encode(), value, headers))
            if fault:
                fault("handled")
            until_redis_answers(agg.intend, stop, "noting decisions before their commit")
            if not txn.commit(consumer, encoded, msgs):  # recovered and rewound: the batch comes again
                agg.abandoned()
                time.sleep(RETRY_BACKOFF_S)
                continue
            if fault:
                fault("committed")
            until_redis_answers(agg.committed, stop, "marking decided tasks")
        if not txn.failures:
            txn.anchor(consumer)  # stopping: the last batch's outputs are decided before the process is gone
    finally:
        consumer.close()


def dead_letter(settings: Any, codec: Any, msg: Any, exc: BaseException) -> tuple[str, bytes | None, bytes, list]:
    """The encoded DeadLetter (prefs.dlq) of an annotation the aggregator cannot decode or does not accept."""
    from streams.kafka import deadletter, topics

    detail = (str(exc) if isinstance(exc, SignatureError) else
              f"the aggregator cannot decode this Annotation ({type(exc).__name__}: {exc}); only the review app "
              "writes prefs.annotations: publish verdicts through its API")
    record = deadletter.dead_letter(msg, getattr(exc, "reason", None) or "undecodable", detail, "aggregator",
                                    type(exc).__name__)
    log.error("%s Annotation at %s[%s]@%s dead-lettered: %s", "refused" if isinstance(exc, SignatureError) else
              "unreadable", msg.topic(), msg.partition(), msg.offset(), exc)
    deadletter.DLQ.labels(record["reason"]).inc()
    topic = settings.topic(topics.DLQ)
    key = msg.key() if msg.key() is None or len(msg.key()) <= 1024 else None
    try:
        value, headers = codec.encode("DeadLetter", record, topic)
    except Exception:  # a DeadLetter always goes out: without the original's bytes if it will not encode
        key, (value, headers) = None, codec.encode("DeadLetter", deadletter.bare(record), topic)
    return topic, key, value, headers
