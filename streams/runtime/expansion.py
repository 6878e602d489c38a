"""Error-driven expansion, the processor: prefs.verified in, ``neighbour_of_error`` review tasks out.

The worker's main loop calls ``Expansion.step`` between raw batches (as it does the second look), so the index,
the scorer and the review budget are never shared between threads. For each VerifiedPair whose verdict
corrected the model (curation/expansion.py says when, and which neighbours go to review), the corrected pair's
p and embedding are read from the retrieval store (retrieval/store.py), its 8 nearest neighbours from
the worker's index, their route, p and whole pair from the store; neighbours scored by an older version than the
serving one are scored again. The review tasks and the prefs.verified offsets commit in one transaction of the
expansion's own producer (transactional id ``<worker's>-expansion``); a step redone after a crash makes the same
tasks with the same ids (streams/review/task_ids.py), which the review queue adds once. Only committed
VerifiedPairs are read (the aggregator marks prefs.verified; streams/kafka/committed.py).

The tasks come out of the worker's review budget. Neighbours sent once are remembered in Redis (after the
commit), so a pair near several corrections is sent once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import KafkaError as KafkaErrorCode

from schemas.pairs import clip, prompt_text
from schemas.records import SimilarPair
from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.committed import CommittedFilter
from streams.kafka.config import consumer_config
from streams.kafka.reader import SeenSet, identity
from streams.kafka.transactions import BatchTransactions, Output, rewind
from streams.review.aggregator import final_key
from streams.review.queue import DEFAULT_RETENTION_S
from streams.runtime import metrics
from streams.runtime.curation import expansion
from streams.runtime.isolation import REDONE
from streams.runtime.outputs import review_task
from streams.runtime.pipeline import Pipeline
from streams.runtime.processors.router import MAX_SIMILAR
from streams.runtime.retrieval.index import NEIGHBOUR_TEXT_CHARS
from streams.settings import WORKER_MAX_POLL_INTERVAL_MS, Settings, WorkerSettings

log = logging.getLogger(__name__)
# VerifiedPairs one step handles at most: each costs a few index searches and Redis reads.
MAX_STEP = 32
SEEN_MAX = 100_000


# As long as the review queue keeps a decided task's keys (streams/review/queue.py).
SENT_RETENTION_S = DEFAULT_RETENTION_S


def sent_key(prefix: str) -> str:
    """The sorted set of pair ids already sent to review as a neighbour of an error, by when they were sent."""
    return f"{prefix}prefstream:expansion:sent"


class Expansion:
    """The consumer of prefs.verified and its transactions, stepped by the worker's main loop."""

    def __init__(self, settings: Settings, wsettings: WorkerSettings, pipeline: Pipeline, transactional_id: str,
                 stop: threading.Event | None = None) -> None:
        self.settings, self.pipeline = settings, pipeline
        self.stop = stop or threading.Event()
        self.prefix = settings.topic_prefix
        self.topic = settings.topic(topics.VERIFIED)
        self.review_topic = pipeline.out_topics[topics.REVIEW]
        self.codec = ValueCodec(settings.schema_registry_url)
        self.enabled = pipeline.store.enabled
        self.consumer: Consumer | None = None
        if self.enabled:  # without the store there is no p or route of a neighbour to look at again
            self.consumer = Consumer(consumer_config(
                settings, f"{settings.topic_prefix}{wsettings.group}-expansion", background=True)
                | {"max.poll.interval.ms": WORKER_MAX_POLL_INTERVAL_MS})
            self.consumer.subscribe([self.topic], on_revoke=self._revoked)
            self.txn = BatchTransactions(settings, f"{transactional_id}-expansion", stop=self.stop,
                                         marked=[self.review_topic, pipeline.out_topics[topics.DLQ]])
        self.filter = CommittedFilter()
        self.seen = SeenSet(SEEN_MAX)
        self.errors_logged: set[str] = set()

    def _revoked(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.filter.reset(tp.topic, tp.partition)

    def step(self, limit: int = MAX_STEP) -> int:
        """Handle at most ``limit`` VerifiedPairs and commit their review tasks; the number of records handled.
        Infrastructure errors (broker, Redis, the scorer failing) roll the step back, to be redone."""
        if self.consumer is None:  # not enabled
            return 0
        self.txn.poll()
        try:
            msgs = self.consumer.consume(max(1, min(limit, MAX_STEP)), 0)
            for m in msgs:
                err = m.error()
                if err and err.code() != KafkaErrorCode._PARTITION_EOF and err.str() not in self.errors_logged:
                    self.errors_logged.add(err.str())
                    log.warning("%s: %s (create it with `prefstream topics create`)", self.topic, err.str())
            msgs = [m for m in msgs if not m.error()]
            if not msgs:
                self.txn.anchor(self.consumer)
                return 0
            return self._handle(self.consumer, msgs)
        except REDONE as exc:
            log.warning("error-driven expansion on %s failed (%s); redoing it from the committed offsets", self.topic, exc)
            rewind(self.consumer, self.stop)
            self.filter.reset_all()
            return 0

    def _handle(self, consumer: Consumer, msgs: list[Any]) -> int:
        released: list[tuple[Any, bool]] = []
        for m in sorted(msgs, key=lambda m: (m.topic(), m.partition(), m.offset())):
            released += self.filter.add(m)
        outputs: list[Output] = []
        sent: dict[str, str] = {}  # neighbour pair id -> the task id sent for it in this step
        verified = []
        for m, data in released:
            if not data:
                continue
            try:
                rec = self.codec.decode("VerifiedPair", m.value(), m.headers(), self.topic)
            except Exception as exc:  # a record that cannot be read is a dead letter, not a stop
                outputs.append(self.pipeline.emit.fail(m, "decode", exc))
                continue
            if identity("VerifiedPair", rec) not in self.seen:
                verified.append(rec)
        for rec in verified:
            try:
                outputs += self.expand(rec, sent)
            except REDONE:
                raise
            except Exception:  # a bug or a record it cannot handle: the verdict stands, its neighbours stay as they are
                metrics.EXPANSION.labels("failed").inc()
                log.exception("could not look again at the neighbours of %s", rec["pair"]["pair_id"])
        handled = [m for m, _ in released]
        if (handled or outputs) and not self.txn.commit(consumer, outputs, handled):
            self.filter.reset_all()
            return 0
        for rec in verified:
            self.seen.add(identity("VerifiedPair", rec))
        if sent:
            now = time.time()
            pipe = self.pipeline.redis.pipeline(transaction=False)
            pipe.zadd(sent_key(self.prefix), dict.fromkeys(sent, now))
            pipe.zremrangebyscore(sent_key(self.prefix), 0, now - SENT_RETENTION_S)
            pipe.execute()
            metrics.EXPANSION.labels("sent").inc(len(sent))
        for topic, *_ in outputs:
            metrics.RECORDS_OUT.labels(topic).inc()
        return len(handled)

    def expand(self, rec: dict[str, Any], sent: dict[str, str]) -> list[Output]:
        """The review tasks for the neighbours of one VerifiedPair (none unless its verdict corrected the model)."""
        if rec["label"] not in ("kept", "flipped"):
            return []  # a tie or both_bad verdict prefers no side: it says nothing about the model's
        pid = rec["pair"]["pair_id"]
        human_side = "chosen" if rec["label"] == "kept" else "rejected"
        store = self.pipeline.store
        corrected = store.get([pid]).get(pid)
        if corrected is None or not expansion.is_correction(corrected.p, human_side):
            return []
        metrics.EXPANSION.labels("correction").inc()
        index = self.pipeline.index
        neighbours = index.search(corrected.vec, MAX_SIMILAR, exclude=pid)
        ids = [n["pair_id"] for n in neighbours]
        stored = store.get(ids)
        finals = dict(zip(ids, self.pipeline.redis.hmget(final_key(self.prefix), ids), strict=True)) if ids else {}
        was_sent = self._sent_before(ids)
        evidence = [expansion.Evidence(1.0, 1 - expansion.side_p(corrected.p, human_side))]
        for n in neighbours:
            final, s = finals.get(n["pair_id"]), stored.get(n["pair_id"])
            # A verified neighbour that prefers a side: did the model get it right? (tie and both_bad say nothing.)
            if final is not None and s is not None and final.decode() in ("chosen", "rejected"):
                evidence.append(expansion.Evidence(n["similarity"], 1 - expansion.side_p(s.p, final.decode())))
        error = expansion.error_vote(evidence)
        candidates = [(n, stored[n["pair_id"]]) for n in neighbours
                      if n["pair_id"] in stored and finals.get(n["pair_id"]) is None and n["pair_id"] not in was_sent
                      and n["pair_id"] not in sent and stored[n["pair_id"]].route in expansion.ELIGIBLE
                      and stored[n["pair_id"]].whole]
        if skipped := len(neighbours) - len(candidates):
            metrics.EXPANSION.labels("not_eligible").inc(skipped)
        scores = self._current_scores([s for _, s in candidates])
        decided = []
        for (n, s), score in zip(candidates, scores, strict=True):
            category = s.pair.get("task_category")
            decision = expansion.look_again(s.route, score["p"], n["similarity"], error,
                                            self.pipeline.policy.tau_for(category), pid)
            if decision is None:
                metrics.EXPANSION.labels("confident").inc()
            else:
                decided.append((n, s, score, decision))
        # The most doubtful first, as far as the review budget goes.
        decided.sort(key=lambda d: expansion.guided_label_p(d[1].route, d[2]["p"], d[0]["similarity"], error))
        allowed = self.pipeline.budget.allow(len(decided), 0)
        if len(decided) > allowed:
            metrics.EXPANSION.labels("over_budget").inc(len(decided) - allowed)
        now = int(time.time() * 1000)
        shown = SimilarPair(pair_id=pid, prompt=clip(prompt_text(rec["pair"]), NEIGHBOUR_TEXT_CHARS),
                            chosen=clip(rec["pair"]["chosen"], NEIGHBOUR_TEXT_CHARS),
                            rejected=clip(rec["pair"]["rejected"], NEIGHBOUR_TEXT_CHARS), label_source="human",
                            similarity=1.0)
        out, ids_sent = [], {}
        for n, s, score, decision in decided[:allowed]:
            context = [shown] + index.search(n_vec(index, n["pair_id"], s), max(0, decision.k - 1), exclude=n["pair_id"])
            task_id = self.pipeline.task_ids.of(n["pair_id"])
            task = review_task(s.pair, score, decision, context, now, len(json.dumps(s.pair)), task_id)
            out.append(self.pipeline.emit.out(topics.REVIEW, "ReviewTask", n["pair_id"].encode(), task))
            ids_sent[n["pair_id"]] = task_id
        sent.update(ids_sent)  # only once every task of this verdict encoded: all of them go out, or none
        return out

    def _sent_before(self, ids: list[str]) -> set[str]:
        """Those of ``ids`` an earlier step sent to review as a neighbour of an error."""
        if not ids:
            return set()
        pipe = self.pipeline.redis.pipeline(transaction=False)
        for i in ids:
            pipe.zscore(sent_key(self.prefix), i)
        return {i for i, when in zip(ids, pipe.execute(), strict=True) if when is not None}

    def _current_scores(self, stored: list[Any]) -> list[dict[str, Any]]:
        """Each stored pair's score by the serving model: the stored one when that version scored it."""
        serving = self.pipeline.scorer.versions()[0]
        stale = [i for i, s in enumerate(stored) if s.model_version != serving]
        fresh = self.pipeline.scorer.score([stored[i].pair for i in stale]) if stale else []
        out = [{"p": s.p, "reward_chosen": s.reward_chosen, "reward_rejected": s.reward_rejected,
                "model_version": s.model_version} for s in stored]
        for i, score in zip(stale, fresh, strict=True):
            out[i] = score
        return out

    def close(self) -> None:
        if self.consumer is None:  # not enabled
            return
        if not self.txn.failures:
            self.txn.anchor(self.consumer)
        self.consumer.close()


def n_vec(index: Any, pair_id: str, stored: Any) -> Any:
    """A neighbour's vector: the index's copy, else the store's."""
    slot = index.ids.get(pair_id)
    return index.vectors[slot] if slot is not None else stored.vec
