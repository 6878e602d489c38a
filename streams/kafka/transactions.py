"""Kafka transactions as the worker and the aggregator use them: one transaction per micro-batch,
holding its output records and its input offsets, so they commit together or not at all.

Failures are handled the way librdkafka documents them for transactional producers: a retriable
error retries the same call; an abortable one aborts the transaction and the batch is redone from
the last committed offsets; a fatal one replaces the producer (a new one with the same
transactional id fences the old) and the batch is redone. Nothing is skipped: the consumer is
rewound before it reads on, however long the broker is away.

With ``marked`` topics (the worker, its second look and the aggregator give every topic they write),
each output is stamped and each attempt writes markers, so that readers drop the records of attempts
that did not commit, on a broker that delivers them (streams/kafka/committed.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from streams.exceptions import BrokerError
from streams.kafka.committed import Marking, marker_headers, stamped
from streams.kafka.config import producer_config
from streams.settings import Settings

log = logging.getLogger(__name__)

# How long one transactional call (init, send offsets, commit, abort) may block in this process.
TXN_CALL_TIMEOUT_S = 30.0
# The broker-side transaction.timeout.ms: bounds how long read_committed consumers wait behind a
# transaction left open by a killed process that is not restarted with the same transactional id
# (a restart with it aborts the transaction at once).
TXN_BROKER_TIMEOUT_MS = 15000

Output = tuple[str, bytes | None, bytes, list]  # topic, key, value, headers
# A retriable error retries its call this many times before the batch is aborted and redone.
CALL_RETRIES = 3
RETRY_BACKOFF_S = 1.0
# How often the partition counts of the marked topics are read again (a topic given more partitions
# gets markers there from then on).
MARKED_METADATA_S = 60.0
# After a failed markers-only transaction (the broker away) the next try waits this long, so an idle
# loop that calls ``anchor`` on every pass keeps polling meanwhile.
ANCHOR_RETRY_S = 5.0
# How often an idle stage asks the group's committed offsets of its partitions again, to anchor once more
# when one is past what its last markers named (see ``BatchTransactions.anchor``).
ANCHOR_CHECK_S = 2.0


def transactional_producer(settings: Settings, transactional_id: str) -> Producer:
    """A producer with its transactions initialised; starting it fences an older one with the same id."""
    producer = Producer(producer_config(settings, **{"transactional.id": transactional_id,
                                                     "transaction.timeout.ms": TXN_BROKER_TIMEOUT_MS}))
    try:
        producer.init_transactions(TXN_CALL_TIMEOUT_S)
    except KafkaException as exc:
        raise BrokerError(f"cannot start a transactional producer at {settings.bootstrap}: "
                          f"{exc.args[0].str()}; is the broker up? (`prefstream stack status`)") from exc
    return producer


def next_offsets(msgs: list[Any]) -> list[TopicPartition]:
    """The offsets to commit after ``msgs``: one past the last record of each partition in the batch."""
    last: dict[tuple[str, int], int] = {}
    for m in msgs:
        key = (m.topic(), m.partition())
        last[key] = max(last.get(key, -1), m.offset())
    return [TopicPartition(t, p, off + 1) for (t, p), off in last.items()]


def rewind(consumer: Consumer, stop: threading.Event | None = None) -> None:
    """After an aborted transaction: go back to the last committed offsets and redo the batch.

    Retried until it succeeds (or ``stop`` is set): reading on from the consumer's position after a
    failed commit would skip the batch that was not committed.
    """
    while True:
        try:
            assigned = consumer.assignment()
            if not assigned:
                return
            for tp in consumer.committed(assigned, timeout=10):
                consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))
            return
        except KafkaException as exc:
            if stop is not None and stop.is_set():
                return
            log.warning("cannot rewind to the committed offsets (%s); retrying in %.0f s", exc.args[0].str(),
                        RETRY_BACKOFF_S)
            time.sleep(RETRY_BACKOFF_S)


class BatchTransactions:
    """The transactional producer of a consume-transform-produce loop, and what to do when it fails.

    ``commit`` returns False when the batch must be redone; ``failures`` counts the batches in a row
    that did not commit and ``last_error`` says why (the worker's readiness reads both).
    """

    def __init__(self, settings: Settings, transactional_id: str,
                 make_producer: Callable[[Settings, str], Producer] = transactional_producer,
                 stop: threading.Event | None = None, marked: Iterable[str] = ()) -> None:
        self.settings, self.transactional_id = settings, transactional_id
        self._make_producer = make_producer
        self.stop = stop or threading.Event()
        self.producer: Producer | None = make_producer(settings, transactional_id)
        self.failures = 0
        self.last_error = ""
        self.replaced = 0  # producers replaced after a fatal error
        # ``marked``: every topic the stage writes. Its outputs are stamped and each attempt writes markers
        # there, so that readers drop the records of attempts that did not commit (streams/kafka/committed.py).
        self.marking = Marking(marked) if marked else None
        self._marker_partitions: list[tuple[str, int]] = []
        self._marker_partitions_at = float("-inf")
        self._anchor_after = float("-inf")
        # Per input partition the last committed transaction's stamp named: the committed offset it will leave
        # there. A partition gained since (a rebalance) is anchored too: its predecessor's last batch waits for
        # a marker that names it, and the predecessor, no longer holding it, cannot write one.
        self._named: dict[tuple[str, int], int] = {}
        self._naming: dict[tuple[str, int], int] = {}
        self._checked_at = float("-inf")

    def poll(self) -> None:
        """Serve the producer's queue (librdkafka's log lines come through it)."""
        if self.producer is not None:
            self.producer.poll(0)

    def commit(self, consumer: Consumer, outputs: list[Output], msgs: list[Any]) -> bool:
        """Commit ``outputs`` with the batch's offsets; on failure recover and rewind, and return False.

        A batch with records of a partition the consumer no longer holds is not committed either: a rebalance
        served while the batch was read gave it to another member, which reads it again from the committed
        offset. Committed here too, its rows would follow the new holder's markers, and the new holder, having
        named the partition already, would write none after them: readers would hold them, and every later row
        of their partitions, for good (and on a broker that checks no ownership the offsets would race)."""
        if gone := sorted({(m.topic(), m.partition()) for m in msgs}
                          - {(tp.topic, tp.partition) for tp in consumer.assignment()}):
            log.info("a rebalance took %s while this batch was read; not committed here, its new holder reads it "
                     "again", ", ".join(f"{t}[{p}]" for t, p in gone))
            rewind(consumer, self.stop)
            return False
        try:
            if self.producer is None:
                self.producer = self._make_producer(self.settings, self.transactional_id)
            self._commit(self.producer, consumer, outputs, msgs)
        except (KafkaException, BrokerError) as exc:
            self._recover(exc)
            rewind(consumer, self.stop)
            return False
        self.failures, self.last_error = 0, ""
        return True

    def _commit(self, producer: Producer, consumer: Consumer, outputs: list[Output], msgs: list[Any]) -> None:
        stamp = self._stamp(consumer, msgs) if self.marking is not None else None
        self._call(producer.begin_transaction)
        for topic, key, value, headers in outputs:
            self._produce(producer, topic, value, key, stamped(headers, stamp) if stamp else headers)
        if stamp:
            self._produce_markers(producer, stamp)
        offsets = next_offsets(msgs)
        self._call(lambda: producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(),
                                                                TXN_CALL_TIMEOUT_S))
        self._call(lambda: producer.commit_transaction(TXN_CALL_TIMEOUT_S))
        if self.marking is not None:
            # This batch's rows wait for a later marker; any later transaction's markers name its partitions.
            self.marking.unanchored = bool(outputs)
            self._named = self._naming

    @staticmethod
    def _produce(producer: Producer, topic: str, value: bytes | None, key: bytes | None, headers: list | None,
                 partition: int | None = None) -> None:
        while True:
            try:
                if partition is None:
                    producer.produce(topic, value=value, key=key, headers=headers)
                else:
                    producer.produce(topic, value=value, key=key, headers=headers, partition=partition)
                return
            except BufferError:
                producer.poll(0.1)  # the local queue is full: let deliveries drain, then go on

    def _stamp(self, consumer: Consumer, msgs: list[Any]) -> bytes:
        """The attempt's stamp: the group's committed offsets of the partitions it holds (asked now: after a
        rebalance another worker may have moved them) and the batch's last offsets."""
        assert self.marking is not None, "only a stage that marks its topics stamps its attempts"
        read = {(m.topic(), m.partition()) for m in msgs}
        held = read | {(tp.topic, tp.partition) for tp in consumer.assignment()}
        tps = [TopicPartition(t, p) for t, p in sorted(held)]
        committed = consumer.committed(tps, timeout=TXN_CALL_TIMEOUT_S)
        # Where the consumer reads next on partitions without records in this batch (see Marking.stamp).
        positions = consumer.position([tp for tp in tps if (tp.topic, tp.partition) not in read])
        stamp = self.marking.stamp(committed, msgs, positions)
        self._naming = {(s.topic, s.partition): s.hi + 1 if s.covers_records else s.lo for s in stamp.sources}
        return stamp.encode()

    def _produce_markers(self, producer: Producer, stamp: bytes) -> None:
        """One marker per partition of every marked topic (partition counts read again every MARKED_METADATA_S)."""
        assert self.marking is not None, "only a stage that marks its topics writes markers"
        now = time.monotonic()
        if now - self._marker_partitions_at >= MARKED_METADATA_S:
            found = []
            for topic in self.marking.topics:
                meta = producer.list_topics(topic, timeout=TXN_CALL_TIMEOUT_S).topics.get(topic)
                if meta is None or meta.error is not None or not meta.partitions:
                    raise BrokerError(f"cannot mark topic {topic}: it does not exist at {self.settings.bootstrap} "
                                      f"({meta.error if meta is not None else 'no metadata'}); run `prefstream topics create`")
                found += [(topic, p) for p in sorted(meta.partitions)]
            self._marker_partitions, self._marker_partitions_at = found, now
        headers = marker_headers(stamp)
        for topic, partition in self._marker_partitions:
            self._produce(producer, topic, None, None, headers, partition)

    def anchor(self, consumer: Consumer) -> bool:
        """When idle: a transaction of markers only, so that readers can decide the last batch's rows.

        Needed after a committed transaction with outputs; when the consumer holds a partition its last
        transaction did not name (at start, and after a rebalance: the predecessor's last batch there waits
        for a marker naming it); and when the group's committed offset of a held partition is past the one
        the last markers named. That last check runs every ANCHOR_CHECK_S: right after a commit the embedded
        broker can still answer a committed-offset fetch with the offset before it, and a new holder that has
        read nothing yet has no position to correct it, so its first markers may name the offset where the
        predecessor's last batch began, which decides nothing. A no-op otherwise, or without marking, or while
        the consumer holds no partition. False when it failed (tried again at the next call)."""
        if self.marking is None:
            return True
        held = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        if not self.marking.unanchored and held <= self._named.keys() and not self._named_behind(consumer, held):
            return True
        if time.monotonic() < self._anchor_after or not held:
            return False
        try:
            if self.producer is None:
                self.producer = self._make_producer(self.settings, self.transactional_id)
            producer = self.producer
            stamp = self._stamp(consumer, [])
            self._call(producer.begin_transaction)
            self._produce_markers(producer, stamp)
            self._call(lambda: producer.commit_transaction(TXN_CALL_TIMEOUT_S))
        except (KafkaException, BrokerError) as exc:
            self._recover(exc)
            self._anchor_after = time.monotonic() + ANCHOR_RETRY_S
            return False
        self.marking.unanchored = False
        self._named = self._naming
        self.failures, self.last_error = 0, ""
        return True

    def _named_behind(self, consumer: Consumer, held: set[tuple[str, int]]) -> bool:
        """Whether a held partition's committed offset, asked at most every ANCHOR_CHECK_S, is past the one
        the last markers named there."""
        now = time.monotonic()
        if now - self._checked_at < ANCHOR_CHECK_S:
            return False
        self._checked_at = now
        try:
            committed = consumer.committed([TopicPartition(t, p) for t, p in sorted(held)], timeout=ANCHOR_RETRY_S)
        except KafkaException:
            return False  # the broker is away: asked again at the next check
        return any(tp.offset > self._named.get((tp.topic, tp.partition), tp.offset) for tp in committed)

    def _call(self, call: Callable[[], Any]) -> Any:
        for attempt in range(CALL_RETRIES + 1):
            try:
                return call()
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal() or err.txn_requires_abort() or not err.retriable() or attempt == CALL_RETRIES:
                    raise
                log.info("retriable Kafka error (%s); retrying the call", err.str())
                time.sleep(RETRY_BACKOFF_S)
        return None  # unreachable: the last attempt raises

    def _recover(self, exc: Exception) -> None:
        self.failures += 1
        err = exc.args[0] if isinstance(exc, KafkaException) else None
        self.last_error = err.str() if err is not None else str(exc)
        if err is None or err.fatal():
            log.error("transactional producer unusable (%s); replacing it (the new one fences the old) and "
                      "redoing the batch", self.last_error)
            self._replace_producer()
            return
        log.warning("transaction failed (%s); aborting it and redoing the batch", self.last_error)
        self._abort()

    def _abort(self) -> None:
        producer = self.producer
        if producer is None:
            return
        try:
            self._call(lambda: producer.abort_transaction(TXN_CALL_TIMEOUT_S))
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                self._replace_producer()
            else:  # no transaction open (it failed before begin) or the broker is away: redo anyway
                log.warning("abort did not complete (%s)", err.str())

    def _replace_producer(self) -> None:
        self.producer, self.replaced = None, self.replaced + 1
        try:
            self.producer = self._make_producer(self.settings, self.transactional_id)
        except BrokerError as exc:  # the broker is away: the next commit tries again
            log.warning("%s", exc)
            time.sleep(RETRY_BACKOFF_S)
