"""Consumers that must not act twice dedupe on the record's identity.

The premise, measured here on the embedded broker (Tansu 0.6): a read_committed consumer also
receives the records of an ABORTED transaction. A worker that aborts a batch and redoes it (or is
killed mid-transaction and restarted) therefore leaves two copies of its outputs that every reader
sees. Each test writes such a batch (aborted, then the same identities committed) and checks that
a prefstream consumer acts on each identity once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from schemas.pairs import validate_pair
from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.config import consumer_config, producer_config
from streams.kafka.reader import SeenSet, TopicReader, curated_identity, identity, read_topic, unique
from streams.local import report
from streams.runtime.controller import ScoredMonitor
from streams.runtime.shard_writer import MANIFEST, ShardWriter
from streams.sdk import ScoreConsumer
from streams.settings import Settings, WorkerSettings
from tests.helpers import curated_record, run_writer, scored_record, unique_pairs, write_batch
from trainers.storage.shards import iter_records

N = 20


@pytest.fixture
def redone(settings: Settings) -> list[dict]:
    """N pairs whose batch was aborted and then redone (committed) by the same transactional id."""
    pairs = unique_pairs(N)
    write_batch(settings, pairs, abort=True)
    write_batch(settings, pairs)
    return pairs


def _ids(pairs: list[dict]) -> set[str]:
    return {p["pair_id"] for p in pairs}


# ---------------------------------------------------------------------- identity helpers (no broker)

def test_curated_identity_is_the_same_for_a_redone_batch_even_after_a_model_swap():
    pair = validate_pair({"prompt": "q", "chosen": "a", "rejected": "b"})
    aborted, redone = curated_record(pair, "v1", "silver"), curated_record(pair, "v2", "flipped")
    assert curated_identity(aborted) == curated_identity(redone)
    gold = {**curated_record(pair, None, "gold"), "model_version": None}
    assert curated_identity(gold) != curated_identity(aborted), "a human-verified gold row is a different fact"
    assert identity("ScoredPair", scored_record(pair, "v1")) != identity("ScoredPair", scored_record(pair, "v2"))


def test_seen_set_is_a_bounded_lru():
    seen = SeenSet(3)
    assert [seen.add(k) for k in "abca"] == [True, True, True, False]
    seen.add("d")  # forgets b, the least recently seen ('a' was seen again)
    assert "b" not in seen and "a" in seen and len(seen) == 3
    assert seen.add("b") is True


def test_unique_keeps_the_last_copy_in_first_seen_order():
    pair_a, pair_b = unique_pairs(2)
    first, other, second = scored_record(pair_a, "v1", p=0.1), scored_record(pair_b, "v1"), scored_record(pair_a, "v1", p=0.9)
    assert unique("ScoredPair", [first, other, second]) == [second, other]


# ---------------------------------------------------------------------- the premise, measured

@pytest.mark.integration
def test_premise_the_embedded_broker_delivers_aborted_records_to_read_committed(settings, redone):
    with TopicReader(settings.topic(topics.SCORED), "ScoredPair", settings) as reader:
        records = list(reader.decoded(idle_timeout=3))
    # On Apache Kafka this is N (the aborted copies are hidden); Tansu 0.6 delivers both copies.
    assert len(records) == 2 * N, f"{len(records)} records: has the broker started hiding aborted transactions?"
    assert len({identity("ScoredPair", r.value) for r in records}) == N


# ---------------------------------------------------------------------- each consumer acts once

@pytest.mark.integration
def test_score_consumer_yields_each_identity_once(settings, redone):
    consumer = ScoreConsumer(settings, group="g-idempotent")
    try:
        got = [(r["pair"]["pair_id"], r["model_version"]) for r in consumer.records(idle_timeout=5)]
    finally:
        consumer.close()
    assert sorted(got) == sorted((i, "v1") for i in _ids(redone))
    assert consumer.duplicates == N
    # The skipped copies were committed too: the group has nothing left to read.
    again = ScoreConsumer(settings, group="g-idempotent")
    try:
        assert list(again.records(idle_timeout=5)) == []
    finally:
        again.close()


@pytest.mark.integration
def test_report_counts_each_identity_once(settings, redone):
    scored = report._read(settings, topics.SCORED, "ScoredPair")
    curated = report._read(settings, topics.CURATED, "CuratedPair")
    assert len(scored) == N and len(curated) == N
    by_pair = {rec["pair"]["pair_id"]: rec for rec, _ in curated}
    assert set(by_pair) == _ids(redone)
    # The helpers take the deduplicated lists: 2N records would double the peak rate.
    assert report.throughput(scored)["scored_per_s_peak_10s"] == N / report.PEAK_WINDOW_S


@pytest.mark.integration
def test_controller_monitor_counts_each_identity_once(settings, redone):
    monitor = ScoredMonitor(settings)
    for r in read_topic(settings, topics.SCORED, "ScoredPair"):  # both copies, as the monitor's reader gets them
        monitor.observe(r.value)
    st = monitor.stats["v1"]
    assert len(st.mispredicted) == N and len(st.disagree) == N and monitor.duplicates == N


def _write_old_batches(settings: Settings, sizes: tuple[int, ...] = (100, 60)) -> int:
    """ScoredPairs of version 'old' to partition 0 in a few large producer batches; the high watermark."""
    topic = settings.topic(topics.SCORED)
    codec = ValueCodec(settings.schema_registry_url)
    producer = Producer(producer_config(settings, **{"linger.ms": 200}))
    for size in sizes:
        for pair in unique_pairs(size):
            value, headers = codec.encode("ScoredPair", scored_record(pair, "old"), topic)
            producer.produce(topic, value=value, key=pair["pair_id"].encode(), headers=headers, partition=0)
        assert producer.flush(10) == 0
    consumer = Consumer(consumer_config(settings, None))
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        consumer.close()


@pytest.mark.integration
def test_controller_monitor_follows_only_new_records_once(settings):
    # Premise: the embedded broker's "latest" offset is about the start of the last stored batch, not
    # the end, so a reader that starts there alone would get up to a batch of old records.
    high = _write_old_batches(settings)
    assert high < 160, f"high watermark {high} after 160 records: has the broker started reporting the end?"
    monitor = ScoredMonitor(settings)
    thread = threading.Thread(target=monitor.run, daemon=True)
    thread.start()
    time.sleep(3)  # let it find the partitions' end
    pairs = unique_pairs(N)
    write_batch(settings, pairs, abort=True)
    write_batch(settings, pairs)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and monitor.duplicates < N:
        time.sleep(0.2)
    monitor.stop.set()
    assert "old" not in monitor.stats, "the monitor counted records written before it started"
    assert monitor.duplicates == N and set(monitor.stats) == {"v1"}
    assert len(monitor.stats["v1"].mispredicted) == N and monitor.duplicates == N


def _shard_rows(root: Path) -> list[dict]:
    """The committed shard records, as a retrain reads them."""
    return [rec for _, rec in iter_records(root)]


def _run_writer(settings: Settings, until: Callable[[ShardWriter], bool], timeout: float = 40) -> ShardWriter:
    return run_writer(settings, until, timeout, linger=1.0)


@pytest.mark.integration
def test_shard_writer_writes_each_pair_once_across_restarts(settings, redone):
    root = Path(settings.shards_dir)
    manifest = root / MANIFEST
    first = _run_writer(settings, lambda w: w.duplicates >= N and manifest.exists())
    assert first.duplicates == N
    rows = _shard_rows(root)
    assert sorted(r["pair"]["pair_id"] for r in rows) == sorted(_ids(redone))

    # The batch redone once more after the writer stopped (e.g. a worker killed after it committed
    # but before it knew): a new writer rebuilds the written identities from the shard files.
    write_batch(settings, redone)
    second = _run_writer(settings, lambda w: w.duplicates >= N)
    assert second.duplicates == N
    assert len(_shard_rows(root)) == N
    assert json.loads(manifest.read_text())["totals"] == {"silver": N}


class _FlakyShardWriter(ShardWriter):
    """A shard writer whose first flushes fail as a lost broker (commit) and a full disk would."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faults = [KafkaException(KafkaError(KafkaError._TRANSPORT, "broker away")), OSError(28, "No space left")]

    def _flush(self, partition: int) -> None:
        if self.faults and self.buffers.get(partition):
            raise self.faults.pop(0)
        super()._flush(partition)


@pytest.mark.integration
def test_shard_writer_survives_failed_commits_and_flushes(settings):
    pairs = unique_pairs(N)
    write_batch(settings, pairs)
    stop = threading.Event()
    writer = _FlakyShardWriter(settings, WorkerSettings(shard_max_age_s=0.5), stop)
    thread = threading.Thread(target=writer.run, name="shards", daemon=True)
    thread.start()
    root = Path(settings.shards_dir)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and len(_shard_rows(root)) < N:
        assert thread.is_alive(), "a failed flush must not end the shard writer"
        time.sleep(0.2)
    stop.set()
    thread.join(30)
    assert writer.failures == 2 and not writer.faults
    assert sorted(r["pair"]["pair_id"] for r in _shard_rows(root)) == sorted(_ids(pairs))
