"""The one topic reader: every place that reads and decodes a topic (CLI, report, demo, controller,
review feeder, SDK, tests, benchmarks) goes through ``TopicReader``.

The stream processors that consume, transform and produce in one transaction (worker, shard writer,
aggregator) keep their own group consumers: they commit offsets inside their transactions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as _RdKafkaError

from schemas.exceptions import SchemaError
from schemas.wire import ValueCodec
from streams.exceptions import BrokerError
from streams.kafka.config import consumer_config
from streams.settings import Settings, get_settings

POLL_S = 0.2


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
    """

    def __init__(self, topic: str, schema: str, settings: Settings | None = None, group: str | None = None,
                 from_beginning: bool = True) -> None:
        self.settings = settings or get_settings()
        self.topic, self.schema, self.group = topic, schema, group
        self.codec = ValueCodec(self.settings.schema_registry_url)
        self._consumer = Consumer(consumer_config(self.settings, group,
                                                  **({} if from_beginning else {"auto.offset.reset": "latest"})))
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
        self._pending = None
        self.undecodable = 0

    def _commit_pending(self) -> None:
        if self._pending is not None and self.group:
            self._consumer.commit(message=self._pending, asynchronous=False)
        self._pending = None

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
            if msg.error():
                if msg.error().code() == _RdKafkaError._PARTITION_EOF:
                    continue
                if msg.error().fatal() or msg.error().code() == _RdKafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise BrokerError(f"reading {self.topic}: {msg.error().str()}")
                continue
            last = time.monotonic()
            self._pending = msg
            yield msg

    def decode(self, msg: Any) -> TopicRecord:
        """Decode one raw message with the reader's schema; raises SchemaError if it does not fit."""
        value = self.codec.decode(self.schema, msg.value(), msg.headers(), self.topic)
        return TopicRecord(value, msg.key(), msg.partition(), msg.offset(), msg.timestamp()[1])

    def decoded(self, idle_timeout: float | None = None, skip_undecodable: bool = True) -> Iterator[TopicRecord]:
        """Decoded records; an undecodable one is counted in ``self.undecodable`` and skipped
        (or raised, with ``skip_undecodable=False``)."""
        for msg in self.messages(idle_timeout):
            try:
                yield self.decode(msg)
            except SchemaError:
                if not skip_undecodable:
                    raise
                self.undecodable += 1

    def records(self, idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Decoded values only (what the SDK's consumers iterate)."""
        for record in self.decoded(idle_timeout, skip_undecodable=False):
            yield record.value

    def close(self) -> None:
        try:
            self._commit_pending()
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
