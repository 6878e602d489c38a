"""Transactions that fail: each librdkafka error class takes its documented path, and nothing is skipped.

Unit level, against a recording fake producer and consumer; the real broker stopped mid-stream is
tests/test_broker_outage.py.
"""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streams.kafka import transactions
from streams.kafka.transactions import BatchTransactions
from streams.settings import Settings


def kafka_error(kind: str) -> KafkaException:
    flags = {"retriable": {"retriable": True}, "abortable": {"txn_requires_abort": True},
             "fatal": {"fatal": True}}[kind]
    return KafkaException(KafkaError(KafkaError._TRANSPORT, f"{kind} failure", **flags))


class FakeProducer:
    """Records the transactional calls; ``fail`` maps a call name to the errors it raises, in order."""

    def __init__(self, fail: dict[str, list[KafkaException]] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[str] = []
        self.produced: list[tuple] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail.get(name):
            raise self.fail[name].pop(0)

    def begin_transaction(self) -> None:
        self._call("begin")

    def produce(self, topic, value=None, key=None, headers=None) -> None:
        self.produced.append((topic, key, value))

    def send_offsets_to_transaction(self, offsets, metadata, timeout) -> None:
        self._call("send_offsets")

    def commit_transaction(self, timeout) -> None:
        self._call("commit")

    def abort_transaction(self, timeout) -> None:
        self._call("abort")

    def poll(self, timeout) -> int:
        return 0


class FakeMsg:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def topic(self) -> str:
        return "prefs.raw"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class FakeConsumer:
    def __init__(self, committed: int = 5, unreachable: int = 0, holds: bool = True) -> None:
        self.committed_offset, self.unreachable, self.holds = committed, unreachable, holds
        self.seeks: list[int] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("prefs.raw", 0)] if self.holds else []

    def committed(self, partitions, timeout=None) -> list[TopicPartition]:
        if self.unreachable:
            self.unreachable -= 1
            raise kafka_error("retriable")
        return [TopicPartition("prefs.raw", 0, self.committed_offset)]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append(tp.offset)

    def consumer_group_metadata(self) -> object:
        return object()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(transactions, "RETRY_BACKOFF_S", 0.0)


def run_batch(fail: dict[str, list[KafkaException]], consumer: FakeConsumer | None = None):
    producers: list[FakeProducer] = []

    def make(settings, tid):
        producers.append(FakeProducer(fail if not producers else {}))
        return producers[-1]

    txn = BatchTransactions(Settings(), "tid", make_producer=make)
    consumer = consumer or FakeConsumer()
    ok = txn.commit(consumer, [("prefs.scored", b"k", b"v", [])], [FakeMsg(5), FakeMsg(6)])
    return ok, txn, producers, consumer


def test_a_clean_batch_commits_in_one_transaction():
    ok, txn, (producer,), consumer = run_batch({})
    assert ok and txn.failures == 0
    assert producer.calls == ["begin", "send_offsets", "commit"] and len(producer.produced) == 1
    assert consumer.seeks == []


def test_a_batch_whose_partition_a_rebalance_took_is_not_committed_by_its_old_holder():
    ok, txn, (producer,), consumer = run_batch({}, FakeConsumer(holds=False))
    assert not ok and producer.calls == [] and producer.produced == []
    assert txn.failures == 0  # not a broker failure: the batch is its new holder's now


def test_a_retriable_error_retries_the_same_call_and_commits():
    ok, txn, (producer,), consumer = run_batch({"commit": [kafka_error("retriable"), kafka_error("retriable")]})
    assert ok and txn.failures == 0
    assert producer.calls == ["begin", "send_offsets", "commit", "commit", "commit"]
    assert consumer.seeks == []


def test_retriable_errors_past_the_retries_abort_and_rewind():
    errors = [kafka_error("retriable") for _ in range(transactions.CALL_RETRIES + 1)]
    ok, txn, (producer,), consumer = run_batch({"send_offsets": errors})
    assert not ok and txn.failures == 1 and "retriable failure" in txn.last_error
    assert producer.calls[-1] == "abort" and "commit" not in producer.calls
    assert consumer.seeks == [5], "the batch is redone from the committed offset"


def test_an_abortable_error_aborts_and_rewinds_without_a_new_producer():
    ok, txn, producers, consumer = run_batch({"commit": [kafka_error("abortable")]})
    assert not ok and len(producers) == 1 and txn.replaced == 0
    assert producers[0].calls == ["begin", "send_offsets", "commit", "abort"]
    assert consumer.seeks == [5]


def test_a_fatal_error_replaces_the_producer_and_the_next_batch_commits_with_it():
    ok, txn, producers, consumer = run_batch({"commit": [kafka_error("fatal")]})
    assert not ok and txn.replaced == 1 and len(producers) == 2
    assert "abort" not in producers[0].calls, "a fatal producer is not used again"
    assert consumer.seeks == [5]
    assert txn.commit(consumer, [("prefs.scored", b"k", b"v", [])], [FakeMsg(5)])
    assert producers[1].calls == ["begin", "send_offsets", "commit"] and txn.failures == 0


def test_the_rewind_waits_for_the_broker_instead_of_reading_on():
    consumer = FakeConsumer(unreachable=3)
    ok, _, _, consumer = run_batch({"commit": [kafka_error("abortable")]}, consumer)
    assert not ok and consumer.seeks == [5]


def test_a_producer_that_cannot_be_made_is_made_at_the_next_commit():
    from streams.exceptions import BrokerError

    made: list[FakeProducer] = []
    refusals = [1]

    def make(settings, tid):
        if len(made) == 1 and refusals:
            refusals.pop()
            raise BrokerError("broker away")
        made.append(FakeProducer({"commit": [kafka_error("fatal")]} if not made else {}))
        return made[-1]

    txn = BatchTransactions(Settings(), "tid", make_producer=make)
    consumer = FakeConsumer()
    assert not txn.commit(consumer, [], [FakeMsg(5)])
    assert txn.producer is None, "the replacement was refused while the broker was away"
    assert txn.commit(consumer, [], [FakeMsg(5)]) and len(made) == 2


def test_a_reconnect_storm_logs_one_line_per_window(caplog):
    import logging

    from streams.kafka.config import KAFKA_LOG, REPEAT_WINDOW_S, _RepeatFilter

    repeat = next(f for f in KAFKA_LOG.filters if isinstance(f, _RepeatFilter))
    repeat.seen.clear()
    with caplog.at_level(logging.ERROR, logger="prefstream.kafka"):
        for ms in range(50):
            KAFKA_LOG.error("FAIL: Connect to 127.0.0.1:9092 failed (after %dms in state CONNECT)", ms)
        KAFKA_LOG.error("another kind of message")
    assert [r.getMessage() for r in caplog.records] == [
        "FAIL: Connect to 127.0.0.1:9092 failed (after 0ms in state CONNECT)", "another kind of message"]
    key = next(iter(repeat.seen))
    repeat.seen[key][0] -= REPEAT_WINDOW_S + 1  # the window has passed
    with caplog.at_level(logging.ERROR, logger="prefstream.kafka"):
        KAFKA_LOG.error("FAIL: Connect to 127.0.0.1:9092 failed (after %dms in state CONNECT)", 7)
    assert caplog.records[-1].getMessage().endswith("(49 like it held back)")
