"""The second look: deferred review candidates scored again once a newer model serves.

Pairs the review budget deferred (streams/runtime/curation/budget.py) wait on prefs.deferred as
their ScoredPair; the record's Kafka timestamp is when it was deferred. The worker's main loop calls
``SecondLook.step`` between raw batches, so the scorer is never shared between threads. A record is
due when the serving version is newer than the one that deferred it, or when it has waited longer
than deferred_max_wait_s. Due records are scored again and routed by the normal policy, past the
budget and never deferred twice: a pair still a review candidate goes to review with the reason
"still uncertain after rescoring with <version>" or "deferred for more than N s"; a pair the
model is now sure of is curated or dropped as usual.

Each partition is read head-of-line: the first record that is not due stops its partition (the
consumer seeks back to it and pauses the partition) until the version changes or its deadline
passes. The outputs and the deferred offsets commit in one transaction of the second look's own
producer (transactional id ``<worker's>-deferred``), so a crash loses and repeats nothing.

Only committed records of prefs.deferred are looked at: the worker's transactions mark the topic, and
the records of a worker batch that did not commit (which the embedded broker delivers) are dropped by
a ``CommittedFilter`` (streams/kafka/committed.py) before anything is scored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import KafkaError as KafkaErrorCode

from schemas.wire import ValueCodec
from streams import history
from streams.kafka import topics
from streams.kafka.committed import CommittedFilter
from streams.kafka.config import consumer_config
from streams.kafka.reader import SeenSet, identity
from streams.kafka.transactions import BatchTransactions, Output, rewind
from streams.runtime import metrics
from streams.runtime.isolation import REDONE
from streams.runtime.pipeline import Pipeline
from streams.runtime.processors.router import Route
from streams.runtime.processors.stage import Item
from streams.settings import WORKER_MAX_POLL_INTERVAL_MS, Settings, WorkerSettings
from trainers.storage.registry import BOOTSTRAP_VERSION

log = logging.getLogger(__name__)
# Deferred records one step scores at most: a step runs between raw batches and must stay short.
MAX_STEP = 64
# ScoredPair identities already handled (a batch the worker aborted and redid defers its pairs twice
# on a broker whose read_committed still delivers aborted records): far more than a step holds.
SEEN_MAX = 100_000
NEWER = "newer"
WAITED = "waited"


def version_time(version: str) -> str | None:
    """The '<YYYYmmdd>-<HHMMSS>' of a store version name (<role>-<date>-<time>-<hex>), None for others."""
    parts = version.split("-")
    if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit():
        return f"{parts[1]}-{parts[2]}"
    return None


def is_newer(serving: str, deferred_by: str) -> bool:
    """Whether ``serving`` is a newer version than ``deferred_by``: any published version is newer than
    the bootstrap model; two published ones compare by their publication time (a rollback is not newer)."""
    if serving == deferred_by or serving == BOOTSTRAP_VERSION:
        return False
    if deferred_by == BOOTSTRAP_VERSION:
        return True
    mine, theirs = version_time(serving), version_time(deferred_by)
    return mine > theirs if mine and theirs else True


def due(deferred_by: str, serving: str, deferred_at_ms: int, now_ms: int, max_wait_ms: int) -> str | None:
    """NEWER when a newer version serves, WAITED when the pair has waited longer than ``max_wait_ms``,
    None when it is not due yet."""
    if is_newer(serving, deferred_by):
        return NEWER
    if now_ms - deferred_at_ms > max_wait_ms:
        return WAITED
    return None


def unpaused(consumer: Any, partitions: list[TopicPartition]) -> None:
    """The assign callback: take the partitions and read every one of them. librdkafka keeps a partition's pause
    across a rebalance that gives it back (confluentinc/librdkafka#1849), while the second look forgets the blocks
    of the partitions it is revoked; a partition paused then would stay paused for good, its deferred pairs
    never scored again."""
    consumer.assign(partitions)
    consumer.resume(partitions)


@dataclass(frozen=True)
class Block:
    """Why a partition is paused: its head record, at ``offset``, was deferred by ``version`` at ``deferred_at_ms``."""

    offset: int
    version: str
    deferred_at_ms: int


class SecondLook:
    """The consumer of prefs.deferred and its transactions, stepped by the worker's main loop."""

    def __init__(self, settings: Settings, wsettings: WorkerSettings, pipeline: Pipeline, transactional_id: str,
                 stop: threading.Event | None = None) -> None:
        self.settings, self.pipeline = settings, pipeline
        self.stop = stop or threading.Event()
        self.topic = settings.topic(topics.DEFERRED)
        self.max_wait_ms = int(wsettings.deferred_max_wait_s * 1000)
        self.codec = ValueCodec(settings.schema_registry_url)
        # Its own group: the workers share prefs.deferred's partitions as they share prefs.raw's.
        self.consumer = Consumer(consumer_config(
            settings, f"{settings.topic_prefix}{wsettings.group}-deferred", background=True)
            | {"max.poll.interval.ms": WORKER_MAX_POLL_INTERVAL_MS})
        self.consumer.subscribe([self.topic], on_assign=unpaused, on_revoke=self._revoked)
        # Marks what it writes, as the worker does; not prefs.deferred, which it reads (and never writes).
        self.txn = BatchTransactions(settings, f"{transactional_id}-deferred", stop=self.stop,
                                     marked=[t for name, t in pipeline.out_topics.items() if name != topics.DEFERRED])
        self.filter = CommittedFilter()
        self.blocked: dict[tuple[str, int], Block] = {}
        self.seen = SeenSet(SEEN_MAX)
        self.errors_logged: set[str] = set()

    def _revoked(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.blocked.pop((tp.topic, tp.partition), None)
            self.filter.reset(tp.topic, tp.partition)

    def _unblock(self, serving: str, now_ms: int) -> None:
        """Resume the paused partitions whose head record is due now."""
        self._resume([key for key, b in self.blocked.items()
                      if due(b.version, serving, b.deferred_at_ms, now_ms, self.max_wait_ms)])

    def _resume(self, keys: list[tuple[str, int]]) -> None:
        if keys:
            self.consumer.resume([TopicPartition(t, p) for t, p in keys])
            for key in keys:
                del self.blocked[key]

    def _fetch(self, limit: int) -> list[Any]:
        msgs = self.consumer.consume(limit, 0)
        for m in msgs:
            err = m.error()
            if err and err.code() != KafkaErrorCode._PARTITION_EOF and err.str() not in self.errors_logged:
                self.errors_logged.add(err.str())  # once each: a missing topic would repeat every step
                log.warning("%s: %s (create it with `prefstream topics create`)", self.topic, err.str())
        return [m for m in msgs if not m.error()]

    def step(self, limit: int = MAX_STEP) -> int:
        """Score at most ``limit`` due deferred records again and commit their outputs; the number of
        records handled. The worker passes what its models score in a batch's target time, so a step
        keeps the raw consumer's poll interval short.

        Infrastructure errors (broker, Redis, a stage failing for all) roll the step back, to be redone."""
        self.txn.poll()
        serving = self.pipeline.scorer.versions()[0]
        now_ms = int(time.time() * 1000)
        try:
            self._unblock(serving, now_ms)
            msgs = self._fetch(max(1, min(limit, MAX_STEP)))
            if not msgs:
                self.txn.anchor(self.consumer)  # idle: lets readers decide the last step's rows
                return 0
            return self._handle(msgs, serving, now_ms)
        except REDONE as exc:
            log.warning("second look on %s failed (%s); redoing it from the committed offsets", self.topic, exc)
            self._resume(list(self.blocked))  # every partition is read again from its committed offset
            rewind(self.consumer, self.stop)
            self.filter.reset_all()
            return 0

    def _handle(self, msgs: list[Any], serving: str, now_ms: int) -> int:
        by_partition: dict[tuple[str, int], list[tuple[Any, bool]]] = defaultdict(list)
        for m in sorted(msgs, key=lambda m: (m.topic(), m.partition(), m.offset())):
            # Released in order once decided; False: a marker, or a record of a batch that did not commit.
            for released, data in self.filter.add(m):
                by_partition[(released.topic(), released.partition())].append((released, data))
        outputs: list[Output] = []
        handled: list[Any] = []  # every record whose offset moves with this transaction
        skipped = 0  # of which markers and dropped records (a step of those alone commits nothing)
        rescore: list[tuple[Any, dict, str]] = []
        blocks: dict[tuple[str, int], Block] = {}
        ids: set[Any] = set()
        for key, part in by_partition.items():
            for m, data in part:
                if not data:
                    handled.append(m)
                    skipped += 1
                    continue
                try:
                    rec = self.codec.decode("ScoredPair", m.value(), m.headers(), self.topic)
                except Exception as exc:  # a record that cannot be read is a dead letter, not a stop
                    outputs.append(self.pipeline.emit.fail(m, "decode", exc))
                    handled.append(m)
                    continue
                if identity("ScoredPair", rec) in self.seen:
                    handled.append(m)  # the copy of an aborted batch that was redone: handled already
                    continue
                deferred_at = deferred_at_ms(m, rec)
                why = due(rec["model_version"], serving, deferred_at, now_ms, self.max_wait_ms)
                if why is None:
                    blocks[key] = Block(m.offset(), rec["model_version"], deferred_at)
                    break
                if identity("ScoredPair", rec) in ids:
                    handled.append(m)
                    continue
                ids.add(identity("ScoredPair", rec))
                rescore.append((m, rec, why))
                handled.append(m)
        self.pipeline.take_routed()  # the counts of an earlier step that did not commit
        if rescore:
            reasons = {id(m): (why, rec) for m, rec, why in rescore}
            outputs += self.pipeline.process_deferred([m for m, _, _ in rescore], [rec["pair"] for _, rec, _ in rescore],
                                                      lambda it, d: self._reason(it, d, reasons[id(it.msg)], serving))
        if len(handled) > skipped or outputs:
            if not self.txn.commit(self.consumer, outputs, handled):
                self.filter.reset_all()
                return 0  # rewound to the committed offsets: everything is looked at again next step
        else:
            # Only the worker's markers, or records not due yet: idle as far as this stage's rows go. A busy
            # worker marks prefs.deferred with every batch, so waiting for an empty fetch would hold this
            # stage's last rows from every reader for as long as the stream flows.
            self.txn.anchor(self.consumer)
        for topic, *_ in outputs:
            metrics.RECORDS_OUT.labels(topic).inc()
        history.add(self.pipeline.redis, self.settings.topic_prefix, history.ROUTES, self.pipeline.take_routed())
        for _, rec, _ in rescore:
            self.seen.add(identity("ScoredPair", rec))
        for (t, p), block in blocks.items():
            tp = TopicPartition(t, p, block.offset)
            self.consumer.seek(tp)  # the records fetched after the head are read again on resume
            self.consumer.pause([tp])
            self.filter.reset(t, p)  # and those held undecided after it
            self.blocked[(t, p)] = block
        return len(handled)

    def _reason(self, it: Item, decision: Route, why_rec: tuple[str, dict], serving: str) -> str:
        """The review reason of a pair still a review candidate after its second look."""
        why, rec = why_rec
        if why == NEWER:
            return f"still uncertain after rescoring with {serving} ({decision.reason}, p={it.scored['p']:.3f})"
        return (f"deferred for more than {self.max_wait_ms / 1000:.0f} s ({decision.reason}, p={it.scored['p']:.3f} "
                f"by {serving}; deferred by {rec['model_version']})")

    def close(self) -> None:
        if not self.txn.failures:
            self.txn.anchor(self.consumer)
        self.consumer.close()


def deferred_at_ms(msg: Any, rec: dict) -> int:
    """When the pair was deferred: its record's Kafka timestamp, else when it was scored."""
    kind, ts = msg.timestamp()
    return ts if kind and ts > 0 else int(rec["scored_at"])


