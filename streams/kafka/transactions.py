"""Kafka transactions as the worker and the aggregator use them: one transaction per micro-batch,
holding its output records and its input offsets, so they commit together or not at all.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from streams.exceptions import BrokerError
from streams.kafka.config import producer_config
from streams.settings import Settings

# How long one transactional call (init, send offsets, commit, abort) may block in this process.
TXN_CALL_TIMEOUT_S = 30.0
# The broker-side transaction.timeout.ms: bounds how long read_committed consumers wait behind a
# transaction left open by a killed process that is not restarted with the same transactional id
# (a restart with it aborts the transaction at once).
TXN_BROKER_TIMEOUT_MS = 15000

Output = tuple[str, bytes | None, bytes, list]  # topic, key, value, headers


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


def commit_batch(producer: Producer, consumer: Consumer, outputs: list[Output],
                 msgs: list[Any]) -> None:
    """One transaction: every output record and the batch's input offsets, or nothing.

    The offsets are the batch's own rather than the consumer's position, so a commit can never
    cover a record that was fetched but not processed.
    """
    producer.begin_transaction()
    for topic, key, value, headers in outputs:
        producer.produce(topic, value=value, key=key, headers=headers)
    producer.send_offsets_to_transaction(next_offsets(msgs), consumer.consumer_group_metadata(), TXN_CALL_TIMEOUT_S)
    producer.commit_transaction(TXN_CALL_TIMEOUT_S)


def rewind(consumer: Consumer) -> None:
    """After an aborted transaction: go back to the last committed offsets and redo the batch."""
    assigned = consumer.assignment()
    if not assigned:
        return
    for tp in consumer.committed(assigned, timeout=10):
        consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING))
