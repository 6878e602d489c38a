"""Only committed records reach a shard, a decision or a count, on the embedded broker too.

The premise, checked here on the embedded broker (Tansu 0.6): a consumer also receives the records
of an aborted transaction. The transactional stages (worker, second look, aggregator) stamp their
outputs and mark their topics; every reader (shard writer, TopicReader and what uses it: the
controller's monitor, the feeder, the SDK, the report) releases a record only once a later marker
says its transaction committed (streams/kafka/committed.py). Unit tests drive the filter with the
cases that matter; integration tests abort real transactions of ``BatchTransactions`` and of the
aggregator, redo them differently, and read the shards back.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from schemas.pairs import validate_pair
from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.committed import MARKER_HEADER, TXN_HEADER, CommittedFilter, Source, Stamp, outcome
from streams.kafka.config import consumer_config
from streams.kafka.reader import read_topic
from streams.kafka.transactions import BatchTransactions, transactional_producer
from streams.runtime.controller import ScoredMonitor
from streams.runtime.shard_writer import ShardWriter
from streams.settings import Settings, WorkerSettings
from tests.helpers import (
    FakeMessage,
    aborting_producer,
    every_record,
    publish,
    raw_batch,
    review_task,
    run_writer,
)
from trainers.storage.shards import iter_records

RAW = "t.prefs.raw"


# ---------------------------------------------------------------------------------------- the filter alone
def _stamp(attempt: str, *sources: tuple[int, int, int]) -> bytes:
    """A stamp over input partitions of RAW given as (partition, lo, hi)."""
    return Stamp(attempt, tuple(Source(RAW, p, lo, hi) for p, lo, hi in sources)).encode()


def _row(offset: int, attempt: str, *sources: tuple[int, int, int], value: bytes = b"row") -> FakeMessage:
    return FakeMessage(value, headers=[("prefstream-schema", b"x"), (TXN_HEADER, _stamp(attempt, *sources))],
                       topic="t.prefs.curated", offset=offset)


def _marker(offset: int, attempt: str, *sources: tuple[int, int, int]) -> FakeMessage:
    return FakeMessage(None, headers=[(TXN_HEADER, _stamp(attempt, *sources)), (MARKER_HEADER, b"1")],
                       topic="t.prefs.curated", offset=offset)


def _feed(flt: CommittedFilter, msgs: list[FakeMessage]) -> list[tuple[int, bool]]:
    return [(m.offset(), keep) for msg in msgs for m, keep in flt.add(msg)]


def test_an_aborted_batch_redone_with_another_route_leaves_exactly_the_redone_rows():
    flt = CommittedFilter()
    # Attempt a read raw[0] 10..12 (committed offset 10) and wrote a silver row; it aborted, and the
    # redo b read the same records from the same committed offset and wrote a flipped row instead.
    released = _feed(flt, [_row(0, "a", (0, 10, 12), value=b"silver"), _marker(1, "a", (0, 10, 12)),
                           _row(2, "b", (0, 10, 12), value=b"flipped"), _marker(3, "b", (0, 10, 12))])
    assert released == [(0, False), (1, False)], "b's marker (same records again) says a aborted; b waits"
    assert flt.held() == 2
    # b committed: the next marker of the stage finds the committed offset past b's batch.
    assert _feed(flt, [_marker(4, "c", (0, 13, 12))]) == [(2, True), (3, False), (4, False)]
    assert flt.dropped == 1 and flt.held() == 0


def test_a_stale_committed_offset_fetch_does_not_make_a_committed_batch_look_redone():
    from streams.kafka.committed import Marking

    marking = Marking(["t.prefs.scored"])
    raw = "t.prefs.raw"
    # Attempt a read raw[1] 306 and committed. Right after, the embedded broker may still answer a
    # committed-offset fetch with 306; the consumer reads on at 307 (it rewinds only after an abort).
    a = marking.stamp([TopicPartition(raw, 1, 306)], [FakeMessage(b"x", topic=raw, partition=1, offset=306)])
    b = marking.stamp([TopicPartition(raw, 1, 306), TopicPartition(raw, 0, 331)],
                      [FakeMessage(b"y", topic=raw, partition=1, offset=307)], [TopicPartition(raw, 0, 331)])
    assert b.source(raw, 1) == Source(raw, 1, 307, 307) and outcome(a, b) is True
    # An idle markers-only attempt: the consumer's position, not the stale fetch, is where it stands.
    idle = marking.stamp([TopicPartition(raw, 1, 306)], [], [TopicPartition(raw, 1, 308)])
    assert idle.source(raw, 1) == Source(raw, 1, 308, 307) and outcome(a, idle) is True
    # After an abort the consumer rewinds and reads 306 again: a is still judged redone.
    redo = marking.stamp([TopicPartition(raw, 1, 306)], [FakeMessage(b"x", topic=raw, partition=1, offset=306)])
    assert outcome(a, redo) is False


def test_a_row_whose_redo_writes_nothing_to_its_partition_is_dropped():
    flt = CommittedFilter()
    # The redo routed the pair to review: nothing of b in this partition but its marker.
    assert _feed(flt, [_row(0, "a", (0, 10, 12)), _marker(1, "a", (0, 10, 12)), _marker(2, "b", (0, 10, 12))]) == \
        [(0, False), (1, False), (2, False)]


def test_the_rows_of_a_worker_killed_before_its_marker_are_dropped_when_the_next_owner_reads_them_again():
    flt = CommittedFilter()
    # No marker of a: the worker died mid-transaction. Another worker (or the restarted one) holds the
    # partition now and reads from the same committed offset, further this time.
    assert _feed(flt, [_row(0, "a", (0, 10, 12), (1, 4, 9)), _marker(1, "w2.1", (1, 4, 20))]) == \
        [(0, False), (1, False)]


def test_a_committed_batch_waits_for_a_later_marker_and_what_follows_waits_behind_it():
    flt = CommittedFilter()
    plain = FakeMessage(b"sdk", topic="t.prefs.curated", offset=3)  # a plain producer's record: no stamp
    assert _feed(flt, [_row(0, "a", (0, 10, 12)), _marker(1, "a", (0, 10, 12))]) == []
    # A marker of another input partition, or one whose committed offset is not past a's start, says nothing.
    assert _feed(flt, [_marker(2, "x", (1, 0, 5), (0, 7, 6)), plain]) == []
    assert flt.held() == 4
    assert _feed(flt, [_marker(4, "b", (0, 13, 12))]) == [(0, True), (1, False), (2, False), (3, True), (4, False)]


def test_records_without_a_stamp_pass_and_an_unreadable_stamp_is_dropped():
    flt = CommittedFilter()
    bad = FakeMessage(b"x", headers=[(TXN_HEADER, b"{not json")], topic="t.prefs.curated", offset=1)
    nothing = FakeMessage(b"y", headers=[(TXN_HEADER, _stamp("z", (0, 5, 4)))], topic="t.prefs.curated", offset=2)
    assert _feed(flt, [FakeMessage(b"v", topic="t.prefs.curated", offset=0), bad, nothing]) == \
        [(0, True), (1, False), (2, False)]
    assert flt.unreadable == 2


def test_partitions_are_independent_and_reset_forgets_one():
    flt = CommittedFilter()
    other = FakeMessage(b"v", topic="t.prefs.curated", partition=1, offset=0)
    assert _feed(flt, [_row(0, "a", (0, 10, 12)), other]) == [(0, True)]
    assert flt.held("t.prefs.curated", 0) == 1
    flt.reset("t.prefs.curated", 0)
    assert flt.held() == 0


def test_outcome_is_read_only_from_another_attempt_naming_the_same_input_partition():
    a = Stamp("a", (Source(RAW, 0, 10, 12),))
    assert outcome(a, a) is None
    assert outcome(a, Stamp("b", (Source(RAW, 0, 13, 12),))) is True
    assert outcome(a, Stamp("b", (Source(RAW, 0, 10, 30),))) is False
    assert outcome(a, Stamp("b", (Source(RAW, 0, 10, 9),))) is None  # the committed offset still at a's start
    assert outcome(a, Stamp("b", (Source("other", 0, 99, 99),))) is None


# ---------------------------------------------------------------------------------------- the real broker
def _pairs(n: int) -> list[dict]:
    tag = uuid.uuid4().hex[:6]
    return [validate_pair({"prompt": f"{tag} question {i}?", "chosen": f"answer {i}", "rejected": "no"})
            for i in range(n)]


def _curated(pair: dict, split: str) -> dict:
    return {"pair": pair, "split": split, "p": 0.9, "model_version": "v1", "reason": "test",
            "curated_at": int(time.time() * 1000)}


def _scored(pair: dict, version: str, p: float) -> dict:
    return {"pair": pair, "reward_chosen": 0.0, "reward_rejected": 1.0, "p": p, "model_version": version,
            "gold_reward_chosen": None, "gold_reward_rejected": None, "gold_p": None, "gold_model_version": None,
            "scored_at": int(time.time() * 1000), "route": "silver", "route_reason": "test"}


def _again(consumer: Consumer, n: int) -> list:
    """The batch read again after the rewind to the committed offsets."""
    msgs: list = []
    deadline = time.monotonic() + 20
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += [m for m in consumer.consume(n, 1.0) if not m.error()]
    return msgs


def _encode(settings: Settings, name: str, schema: str, key: str, rec: dict) -> tuple:
    topic = settings.topic(name)
    value, headers = ValueCodec(settings.schema_registry_url).encode(schema, rec, topic)
    return topic, key.encode(), value, headers


def _run_writer(settings: Settings, until: Callable[[ShardWriter], bool], timeout: float = 40) -> ShardWriter:
    return run_writer(settings, until, timeout, linger=1.5)


def _shard_rows(settings: Settings) -> list[dict]:
    return [rec for _, rec in iter_records(Path(settings.shards_dir))]


@pytest.mark.integration
def test_premise_offsets_sent_in_an_aborted_transaction_never_become_the_committed_offsets(settings):
    """What the design stands on, measured on the embedded broker: the group's committed offset moves
    only when a transaction commits (an aborted one, or one fenced by a successor, leaves it)."""
    pairs = _pairs(3)
    group = f"{settings.topic_prefix}worker"
    consumer, msgs = raw_batch(settings, pairs, group)
    curated = settings.topic(topics.CURATED)
    raw = TopicPartition(msgs[0].topic(), 0)

    def committed() -> int:
        return consumer.committed([raw], timeout=10)[0].offset

    producer = transactional_producer(settings, f"{settings.topic_prefix}premise")
    for end, how in ((1, "commit"), (2, "abort"), (3, "fenced")):
        producer.begin_transaction()
        producer.produce(curated, value=b"x", partition=0)
        producer.send_offsets_to_transaction([TopicPartition(raw.topic, 0, end)], consumer.consumer_group_metadata(), 30)
        assert producer.flush(10) == 0
        if how == "commit":
            producer.commit_transaction(30)
        elif how == "abort":
            producer.abort_transaction(30)
        else:  # the process is gone; its successor with the same transactional id fences it
            producer = transactional_producer(settings, f"{settings.topic_prefix}premise")
        time.sleep(0.5)
        assert committed() == 1, f"after a transaction ended by {how}"
    consumer.close()


@pytest.mark.integration
def test_a_batch_aborted_and_redone_with_another_route_reaches_the_shards_as_redone(settings):
    x, y = _pairs(2)
    group = f"{settings.topic_prefix}worker"
    consumer, msgs = raw_batch(settings, [x, y], group)
    marked = [settings.topic(t) for t in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ)]
    txn = BatchTransactions(settings, f"{settings.topic_prefix}w0", make_producer=aborting_producer(1), marked=marked)
    # The first attempt routes both pairs to silver; its commit fails and it is aborted.
    first = [_encode(settings, topics.CURATED, "CuratedPair", p["pair_id"], _curated(p, "silver")) for p in (x, y)]
    assert not txn.commit(consumer, first, msgs)
    # Redone (a newer model, say): x is flipped, y goes to review. y's silver row was produced only in
    # the aborted transaction.
    msgs = _again(consumer, 2)
    assert [m.offset() for m in msgs] == [0, 1], "the rewind reads the batch again from the committed offset"
    task = {"task_id": y["pair_id"], "pair": y, "p": 0.5, "margin": 0.0, "model_version": "v2", "priority": 0.5,
            "reason": "uncertain", "similar": [], "expert": False, "created_at": 0}
    second = [_encode(settings, topics.CURATED, "CuratedPair", x["pair_id"], _curated(x, "flipped")),
              _encode(settings, topics.REVIEW, "ReviewTask", y["pair_id"], task)]
    assert txn.commit(consumer, second, msgs)
    assert txn.anchor(consumer), "idle: a markers-only transaction decides the last batch"
    consumer.close()

    # The premise: the broker delivers the aborted rows (and the markers) to a read_committed consumer.
    delivered = [m for m in every_record(settings, topics.CURATED) if m.value() is not None]
    assert len(delivered) == 3, f"{len(delivered)} curated records: has the broker started hiding aborted ones?"

    writer = _run_writer(settings, lambda w: _shard_rows(settings))
    rows = _shard_rows(settings)
    assert [(r["pair"]["pair_id"], r["split"]) for r in rows] == [(x["pair_id"], "flipped")]
    assert writer.filter.dropped == 2 and writer.duplicates == 0
    # Every TopicReader reads the same: the review task of the redo, no aborted row.
    assert [r.value["split"] for r in read_topic(settings, topics.CURATED, "CuratedPair")] == ["flipped"]
    assert [r.value["task_id"] for r in read_topic(settings, topics.REVIEW, "ReviewTask")] == [y["pair_id"]]


@pytest.mark.integration
def test_a_pair_curated_only_in_a_transaction_that_never_committed_never_reaches_a_shard(settings):
    """A worker dies mid-transaction (its records reached the broker, then nothing); its successor, with
    the same transactional id, fences it and does the batch again with another outcome."""
    (x,) = _pairs(1)
    group = f"{settings.topic_prefix}worker"
    marked = [settings.topic(t) for t in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ)]
    consumer, msgs = raw_batch(settings, [x], group)
    dead = transactional_producer(settings, f"{settings.topic_prefix}w0")
    dead.begin_transaction()
    topic, key, value, headers = _encode(settings, topics.CURATED, "CuratedPair", x["pair_id"], _curated(x, "silver"))
    dead_stamp = Stamp("dead.1", (Source(msgs[0].topic(), 0, 0, msgs[0].offset()),)).encode()
    dead.produce(topic, value=value, key=key, headers=[*headers, (TXN_HEADER, dead_stamp)])
    assert dead.flush(10) == 0  # then the process is gone: no marker, no offsets, no commit
    consumer.close()

    consumer, msgs = raw_batch(settings, [], group)  # the successor holds the partition, nothing read yet
    msgs = _again(consumer, 1)
    txn = BatchTransactions(settings, f"{settings.topic_prefix}w0", marked=marked)  # fences the dead one
    assert txn.commit(consumer, [], msgs)  # this time the pair is dropped by the router: no output
    consumer.close()
    assert [m.value() is not None for m in every_record(settings, topics.CURATED)].count(True) == 1
    _run_writer(settings, lambda w: w.filter.dropped >= 1, timeout=20)
    assert _shard_rows(settings) == []
    assert read_topic(settings, topics.CURATED, "CuratedPair") == []


def _committed_then_revoked(settings: Settings) -> tuple[dict, str, list[str], list]:
    """A worker commits one pair's silver row and loses partition 0 before it is idle: no marker of its own names
    the partition after the row. The pair, the group, the marked topics and the batch."""
    (x,) = _pairs(1)
    group = f"{settings.topic_prefix}worker"
    marked = [settings.topic(t) for t in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ)]
    first, msgs = raw_batch(settings, [x], group)
    txn = BatchTransactions(settings, f"{settings.topic_prefix}w0", marked=marked)
    assert txn.commit(first, [_encode(settings, topics.CURATED, "CuratedPair", x["pair_id"], _curated(x, "silver"))], msgs)
    first.close()
    return x, group, marked, msgs


@pytest.mark.integration
def test_a_rebalance_before_the_idle_marker_leaves_the_last_batch_to_the_partitions_new_holder(settings):
    """A worker commits a batch with outputs and loses the partition before its idle marker; it cannot name
    the partition any more. The new holder, already anchored on its other partition, anchors the gained one,
    so readers take the batch's rows instead of waiting for the partition's next record."""
    x, group, marked, msgs = _committed_then_revoked(settings)

    raw = settings.topic(topics.RAW)
    second = Consumer(consumer_config(settings, group))
    second.assign([TopicPartition(raw, 1)])
    successor = BatchTransactions(settings, f"{settings.topic_prefix}w1", marked=marked)
    assert successor.anchor(second)  # at start, holding partition 1 only
    second.incremental_assign([TopicPartition(raw, 0)])  # the rebalance gives it partition 0
    assert successor.anchor(second)
    second.close()
    _run_writer(settings, lambda w: _shard_rows(settings), timeout=30)
    assert [(r["pair"]["pair_id"], r["split"]) for r in _shard_rows(settings)] == [(x["pair_id"], "silver")]


@pytest.mark.integration
def test_a_batch_read_before_a_rebalance_took_its_partition_writes_and_commits_nothing(settings):
    """A batch spans a rebalance that takes its partition: its old holder must not commit it. Committed, its
    rows would follow the new holder's markers, which name the partition already: no marker would decide them."""
    (x,) = _pairs(1)
    group = f"{settings.topic_prefix}worker"
    curated = settings.topic(topics.CURATED)
    consumer, msgs = raw_batch(settings, [x], group)
    raw = settings.topic(topics.RAW)
    before = consumer.committed([TopicPartition(raw, 0)], timeout=10)[0].offset
    consumer.incremental_unassign([TopicPartition(raw, 0)])  # what the revoke callback leaves
    txn = BatchTransactions(settings, f"{settings.topic_prefix}w0", marked=[curated])
    assert not txn.commit(consumer, [_encode(settings, topics.CURATED, "CuratedPair", x["pair_id"], _curated(x, "silver"))],
                          msgs)
    consumer.close()
    probe = Consumer(consumer_config(settings, group))
    assert probe.committed([TopicPartition(raw, 0)], timeout=10)[0].offset == before
    probe.close()
    assert every_record(settings, topics.CURATED) == [], "the old holder wrote the batch's rows or markers"


class _StaleFirst:
    """A consumer whose first committed-offset fetch of ``stale``'s partitions answers the offsets given there,
    as the embedded broker can answer right after a commit; every other call goes to ``consumer``."""

    def __init__(self, consumer: Consumer, stale: dict[tuple[str, int], int]) -> None:
        self.consumer, self.stale = consumer, dict(stale)

    def committed(self, partitions, timeout=None):
        fresh = self.consumer.committed(partitions, timeout=timeout)
        return [TopicPartition(tp.topic, tp.partition, self.stale.pop((tp.topic, tp.partition), tp.offset))
                for tp in fresh]

    def __getattr__(self, name: str):
        return getattr(self.consumer, name)


@pytest.mark.integration
def test_a_new_holder_whose_first_committed_offset_is_stale_anchors_again_once_it_is_fresh(settings, monkeypatch):
    """The rebalance case above, with the new holder's first committed-offset fetch answering the offset before
    the predecessor's commit (and no position yet, having read nothing): its first markers decide nothing; it
    anchors again once the committed offset it asks is past the one it named."""
    from streams.kafka import transactions

    x, group, marked, msgs = _committed_then_revoked(settings)

    raw = settings.topic(topics.RAW)
    second = Consumer(consumer_config(settings, group))
    second.assign([TopicPartition(raw, 0)])
    stale = _StaleFirst(second, {(raw, 0): msgs[0].offset()})
    successor = BatchTransactions(settings, f"{settings.topic_prefix}w1", marked=marked)
    assert successor.anchor(stale)  # names partition 0 at the offset where x's batch began: decides nothing
    held: list[int] = []
    _run_writer(settings, lambda w: held.append(w.filter.held()) or held[-1] >= 1, timeout=20)
    assert _shard_rows(settings) == [] and max(held) >= 1, "the premise: a stale marker decides nothing"
    monkeypatch.setattr(transactions, "ANCHOR_CHECK_S", 0.0)
    assert successor.anchor(stale)  # the committed offset now answers past the named one: anchored again
    second.close()
    _run_writer(settings, lambda w: _shard_rows(settings), timeout=30)
    assert [(r["pair"]["pair_id"], r["split"]) for r in _shard_rows(settings)] == [(x["pair_id"], "silver")]


@pytest.mark.integration
def test_the_controller_monitor_counts_no_score_of_an_aborted_batch(settings):
    monitor = ScoredMonitor(settings)
    thread = threading.Thread(target=monitor.run, daemon=True)
    thread.start()
    time.sleep(3)  # the monitor reads records written after it started
    pairs = _pairs(4)
    consumer, msgs = raw_batch(settings, pairs, f"{settings.topic_prefix}worker")
    txn = BatchTransactions(settings, f"{settings.topic_prefix}w0", make_producer=aborting_producer(1),
                            marked=[settings.topic(topics.SCORED)])
    # Scored by a version that mispredicts every pair, aborted; redone after a rollback to a good one.
    bad = [_encode(settings, topics.SCORED, "ScoredPair", p["pair_id"], _scored(p, "v-bad", 0.1)) for p in pairs]
    assert not txn.commit(consumer, bad, msgs)
    good = [_encode(settings, topics.SCORED, "ScoredPair", p["pair_id"], _scored(p, "v-good", 0.9)) for p in pairs]
    assert txn.commit(consumer, good, _again(consumer, len(pairs)))
    assert txn.anchor(consumer)
    consumer.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(getattr(monitor.stats.get("v-good"), "mispredicted", ())) < 4:
        time.sleep(0.2)
    monitor.stop.set()
    assert set(monitor.stats) == {"v-good"}, f"the monitor counted an aborted batch: {set(monitor.stats)}"
    assert list(monitor.stats["v-good"].mispredicted) == [False] * 4


@pytest.mark.integration
def test_an_aggregator_decision_in_an_aborted_transaction_never_reaches_a_shard(settings, monkeypatch):
    """The aggregator decides a task; its transaction aborts after its records reached the broker and
    the aggregator stops. Nothing of that decision is read; restarted, it decides again, once."""
    from streams.kafka import transactions
    from streams.review import aggregator
    from streams.review.app import VerdictIn, annotation
    from streams.review.queue import ReviewQueue

    r = redis.Redis.from_url(settings.redis_url)
    q = ReviewQueue(r, settings.topic_prefix)
    r.set(q.k("initialized"), "1")
    t = review_task(7)
    q.add(t)
    publish(settings, "Annotation", topics.ANNOTATIONS,
            [(t["task_id"], annotation(t, who, VerdictIn(verdict="A"), "chosen_first")) for who in ("x", "y", "z")])

    stop = threading.Event()
    failing = aborting_producer(1, on=topics.CURATED)  # the transaction of the decision

    class StopsAfterAnAbort(transactions.BatchTransactions):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, make_producer=failing, **kwargs)

        def _recover(self, exc: Exception) -> None:
            super()._recover(exc)
            stop.set()  # the process stops right after the abort: no redo in this run

    monkeypatch.setattr(transactions, "BatchTransactions", StopsAfterAnAbort)
    aggregator.run(settings, r, stop, max_batch=8)
    delivered = [m for m in every_record(settings, topics.CURATED) if m.value() is not None]
    assert len(delivered) == 1, "the aborted decision's gold row is on the topic (the broker delivers it)"
    assert read_topic(settings, topics.VERIFIED, "VerifiedPair") == []
    _run_writer(settings, lambda w: False, timeout=3)
    assert _shard_rows(settings) == []

    monkeypatch.undo()
    stop = threading.Event()
    th = threading.Thread(target=aggregator.run, args=(settings, r, stop), kwargs={"max_batch": 8}, daemon=True)
    th.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not read_topic(settings, topics.VERIFIED, "VerifiedPair", idle_timeout=1):
        time.sleep(0.5)
    stop.set()
    th.join(30)
    verified = read_topic(settings, topics.VERIFIED, "VerifiedPair")
    assert [v.value["pair"]["pair_id"] for v in verified] == [t["task_id"]]
    writer = _run_writer(settings, lambda w: bool(_shard_rows(settings)))
    rows = _shard_rows(settings)
    assert [(row["pair"]["pair_id"], row["split"]) for row in rows] == [(t["pair"]["pair_id"], "gold")]
    assert writer.filter.dropped == 1 and writer.duplicates == 0, "the aborted gold row was dropped, not deduplicated"


@pytest.mark.integration
def test_the_second_look_never_rescores_a_pair_deferred_only_in_an_aborted_batch(settings):
    """A worker batch deferred a and b, aborted, and was redone deferring b alone: the second look scores
    b again (and writes its outputs) and never a, whose deferral the broker still delivers."""
    from streams.runtime.deferred import SecondLook
    from streams.runtime.pipeline import Pipeline
    from tests.helpers import FakeEmbedder, FakeRedis, FakeScorer

    class NewerScorer(FakeScorer):  # serves a version newer than the one that deferred the pairs
        def versions(self) -> tuple[str, str | None]:
            return "bootstrap-newer", None

    a, b = _pairs(2)
    consumer, msgs = raw_batch(settings, [a, b], f"{settings.topic_prefix}worker")
    marked = [settings.topic(t) for t in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ, topics.DEFERRED)]
    txn = BatchTransactions(settings, f"{settings.topic_prefix}w0", make_producer=aborting_producer(1), marked=marked)
    deferred = lambda p: _encode(settings, topics.DEFERRED, "ScoredPair", p["pair_id"], _scored(p, "v1", 0.5))  # noqa: E731
    assert not txn.commit(consumer, [deferred(a), deferred(b)], msgs)
    assert txn.commit(consumer, [deferred(b)], _again(consumer, 2))
    assert txn.anchor(consumer)
    consumer.close()
    assert len([m for m in every_record(settings, topics.DEFERRED) if m.value() is not None]) == 3

    pipeline = Pipeline(settings, WorkerSettings(), FakeRedis(), NewerScorer(), FakeEmbedder())
    look = SecondLook(settings, WorkerSettings(), pipeline, f"{settings.topic_prefix}w0")
    try:
        rescored: list[dict] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not rescored:
            look.step()
            rescored = [r.value for r in read_topic(settings, topics.SCORED, "ScoredPair", idle_timeout=0.5)
                        if r.value["model_version"] == "bootstrap"]
        for _ in range(10):  # a little longer: a's second look, were it done, would have come by now
            look.step()
    finally:
        look.close()
    rescored = [r.value["pair"]["pair_id"] for r in read_topic(settings, topics.SCORED, "ScoredPair")
                if r.value["model_version"] == "bootstrap"]
    assert rescored == [b["pair_id"]]
    assert look.filter.dropped == 2  # a and the first copy of b
