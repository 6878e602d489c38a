"""The one topic reader: every place that reads and decodes a topic outside a consume-transform-produce
transaction (CLI, report, demo, controller, review feeder, SDK, tests, benchmarks) goes through
``TopicReader``; the transactional stages keep their own consumers (below).

Committed records only: on the embedded broker (Tansu 0.6) a ``read_committed`` consumer also
receives the records of aborted transactions. Every ``TopicReader`` runs a ``CommittedFilter``
(streams/kafka/committed.py): the stages that write in transactions (worker, second look,
aggregator) stamp their outputs and mark their topics, and the reader yields a stamped record only
once its transaction is known to have committed, never one of an aborted transaction, and never a
marker. Records without the stamp (plain producers) come at once.

Record identity: readers that must not act twice on one fact (a pair replayed, or sent twice) dedupe
on ``identity(schema, record)`` (``TopicReader(dedupe=N)``, the shard writer, the controller, the
report).

The stream processors that consume, transform and produce in one transaction (worker, shard writer,
aggregator) keep their own group consumers: they commit offsets inside their transactions.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as _RdKafkaError

from schemas.exceptions import SchemaError
from schemas.records import UNRANKED_SPLITS
from schemas.wire import ValueCodec
from streams.exceptions import BrokerError
from streams.kafka.committed import CommittedFilter
from streams.kafka.config import consumer_config
from streams.settings import Settings, get_settings

POLL_S = 0.2
# How many identities a deduplicating reader remembers: a bounded LRU set, about 300 bytes per
# ScoredPair identity (31 MB for 100,000 measured with tracemalloc).
DEFAULT_DEDUPE_MAX = 100_000


# The CuratedPair splits the aggregator writes (a human decision); the worker writes the others.
HUMAN_SPLITS = ("gold", *UNRANKED_SPLITS)


def curated_identity(rec: dict[str, Any]) -> tuple[str, str]:
    """(pair_id, 'gold' | 'routed'): what stays the same when a CuratedPair's batch is redone.

    Not (pair_id, split, model_version): a worker that aborts a batch (or is killed mid-transaction)
    may swap models before it redoes the batch, and the new model can route the pair to another
    split. A pair gets one routed CuratedPair from the worker (silver, flipped, verified_by_tool) and,
    when it went to review instead, one gold CuratedPair from the aggregator; the two never come
    from the same scoring, and both are kept. The aggregator's tie and both_bad records are its
    decision too, so they count as 'gold' (one human decision per pair).
    """
    return rec["pair"]["pair_id"], "gold" if rec["split"] in HUMAN_SPLITS else "routed"


IDENTITIES: dict[str, Callable[[dict[str, Any]], Hashable]] = {
    "ScoredPair": lambda r: (r["pair"]["pair_id"], r["model_version"]),
    "CuratedPair": curated_identity,
    "VerifiedPair": lambda r: r["pair"]["pair_id"],  # one human decision per pair (the aggregator's decided key)
    "ReviewTask": lambda r: r["task_id"],
    "Annotation": lambda r: r["annotation_id"],
    "DeadLetter": lambda r: (r["source_topic"], r["source_partition"], r["source_offset"]),
    "ModelVersion": lambda r: (r["role"], r["version"], r["action"], r["announced_at"]),
}


def identity(schema: str, rec: dict[str, Any]) -> Hashable:
    """The identity of a decoded record of ``schema``: two records with the same one are the same
    output written twice (an aborted and a redone transaction), not two facts."""
    return IDENTITIES[schema](rec)


def unique(schema: str, items: Iterable[Any], value: Callable[[Any], dict[str, Any]] = lambda x: x) -> list[Any]:
    """``items`` with one per identity: the last one read (a redone batch comes after the aborted
    one), in the order each identity was first seen. ``value`` gets the record out of an item."""
    out: dict[Hashable, Any] = {}
    for item in items:
        out[identity(schema, value(item))] = item
    return list(out.values())


class SeenSet:
    """The last ``max_size`` identities seen (least recently seen forgotten first)."""

    def __init__(self, max_size: int = DEFAULT_DEDUPE_MAX) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self._seen: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> bool:
        """True if ``key`` is new (and remember it), False if it was seen already."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.max_size:
            self._seen.popitem(last=False)
        return True

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class TopicRecord:
    """One decoded record with where it came from."""

    value: dict[str, Any]
    key: bytes | None
    partition: int
    offset: int
    timestamp_ms: int


class TopicReader:
    """Reads decoded records from one topic.

    With a ``group`` it joins the consumer group and commits each record's offset once the caller
    asks for the next one (so a record is committed only after it was processed). Without a group it
    assigns every partition from the beginning and commits nothing.

    ``from_beginning=False``: only records written from now on. Without a group the reader starts at
    the end of each partition and also skips records whose timestamp is older than the reader: on
    the embedded broker the "end" offset is roughly the start of the last stored batch, not the end,
    so the start offset alone would deliver up to a batch of older records. (With a group the
    committed offsets decide, and "latest" only applies to a group that has none.)

    ``dedupe=N``: ``decoded()`` and ``records()`` skip a record whose ``identity`` is among the last N
    seen by this reader (counted in ``self.duplicates``; its offset is still committed).

    Records of aborted transactions and markers are never yielded (``self.filter`` counts them); a
    stamped record is yielded once a later marker of its stage says its transaction committed, and
    offsets are committed only up to what was released (streams/kafka/committed.py).
    """

    def __init__(self, topic: str, schema: str, settings: Settings | None = None, group: str | None = None,
                 from_beginning: bool = True, dedupe: int | None = None) -> None:
        self.settings = settings or get_settings()
        self.topic, self.schema, self.group = topic, schema, group
        self.since_ms = None if from_beginning or group else int(time.time() * 1000)
        self.seen = SeenSet(dedupe) if dedupe else None
        self.duplicates = 0
        self.codec = ValueCodec(self.settings.schema_registry_url)
        self._consumer = Consumer(consumer_config(self.settings, group)
                                  | ({} if from_beginning else {"auto.offset.reset": "latest"}))
        if group:
            self._consumer.subscribe([topic])
        else:
            try:
                meta = self._consumer.list_topics(topic, timeout=10)
            except KafkaException as exc:
                raise BrokerError(f"cannot read topic {topic} at {self.settings.bootstrap}: {exc.args[0].str()}") from exc
            parts = meta.topics[topic].partitions if topic in meta.topics else {}
            if not parts or meta.topics[topic].error is not None:
                self._consumer.close()
                raise BrokerError(f"topic {topic} does not exist at {self.settings.bootstrap}; run `prefstream stack up`")
            start = OFFSET_BEGINNING if from_beginning else OFFSET_END
            self._consumer.assign([TopicPartition(topic, p, start) for p in parts])
        # The last record released per partition, and the partitions where one was yielded since the
        # last commit: only those are committed when the caller asks for the next record, so markers
        # alone cost no commit (close() commits them too).
        self._pending: dict[tuple[str, int], Any] = {}
        self._yielded: set[tuple[str, int]] = set()
        self.undecodable = 0
        self.filter = CommittedFilter()

    def _commit_pending(self, everything: bool = False) -> None:
        for key in [k for k in self._pending if everything or k in self._yielded]:
            msg = self._pending.pop(key)
            if self.group:
                self._consumer.commit(message=msg, asynchronous=False)
        self._yielded.clear()

    def messages(self, idle_timeout: float | None = None) -> Iterator[Any]:
        """Raw messages; stops after ``idle_timeout`` seconds without a new one (None: never)."""
        last = time.monotonic()
        while True:
            self._commit_pending()
            msg = self._consumer.poll(POLL_S)
            if msg is None:
                if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                    return
                continue
            if err := msg.error():
                if err.code() == _RdKafkaError._PARTITION_EOF:
                    continue
                if err.fatal() or err.code() == _RdKafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise BrokerError(f"reading {self.topic}: {err.str()}")
                continue
            last = time.monotonic()
            for released, committed in self.filter.add(msg):
                self._commit_pending()  # the caller asked for the next record: the last one is done
                key = (released.topic(), released.partition())
                self._pending[key] = released
                if not committed:
                    continue  # a marker, or a record of a transaction that did not commit
                if self.since_ms is not None and 0 < released.timestamp()[1] < self.since_ms:
                    continue  # written before this reader started (see from_beginning)
                self._yielded.add(key)
                yield released

    def decode(self, msg: Any) -> TopicRecord:
        """Decode one raw message with the reader's schema; raises SchemaError if it does not fit."""
        value = self.codec.decode(self.schema, msg.value(), msg.headers(), self.topic)
        return TopicRecord(value, msg.key(), msg.partition(), msg.offset(), msg.timestamp()[1])

    def decoded(self, idle_timeout: float | None = None, skip_undecodable: bool = True) -> Iterator[TopicRecord]:
        """Decoded records; an undecodable one is counted in ``self.undecodable`` and skipped
        (or raised, with ``skip_undecodable=False``)."""
        for msg in self.messages(idle_timeout):
            try:
                record = self.decode(msg)
            except SchemaError:
                if not skip_undecodable:
                    raise
                self.undecodable += 1
                continue
            if self.seen is not None and not self.seen.add(identity(self.schema, record.value)):
                self.duplicates += 1
                continue
            yield record

    def records(self, idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Decoded values only (what the SDK's consumers iterate)."""
        for record in self.decoded(idle_timeout, skip_undecodable=False):
            yield record.value

    def close(self) -> None:
        try:
            self._commit_pending(everything=True)
        finally:
            self._consumer.close()  # leave the group cleanly: a dead member holds it until timeout

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_topic(settings: Settings, logical_topic: str, schema: str, idle_timeout: float = 3.0) -> list[TopicRecord]:
    """Every decodable record of a logical topic (the configured prefix is added), from the beginning.

    Stops after ``idle_timeout`` seconds without a new record. Undecodable records are skipped here;
    the worker dead-letters bad input before it reaches any topic this is used on.
    """
    with TopicReader(settings.topic(logical_topic), schema, settings) as reader:
        return list(reader.decoded(idle_timeout=idle_timeout))
