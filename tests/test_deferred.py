"""The budget defers and re-scores: a worker with a review budget of zero against the real embedded
broker sends every review candidate to prefs.deferred, and its second look scores them again when a
newer version serves, or sends them to review once they waited past the bound."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from streams.kafka import topics
from streams.kafka.reader import TopicReader
from streams.runtime.processors.router import RouterPolicy, route
from streams.sdk import PreferenceProducer
from streams.settings import WorkerSettings
from tests.helpers import WorkerProcess, read_topic, routes_counted, wait_for_scored

pytestmark = pytest.mark.integration


def _pairs(n: int, tag: str) -> list[dict]:
    return [{"pair_id": f"{tag}-{i}", "prompt": f"Say something kind about item {i}.",
             "chosen": f"Item {i} is lovely and useful.", "rejected": "No."} for i in range(n)]


def _produce(settings, pairs) -> set[str]:
    with PreferenceProducer(settings) as producer:
        return {producer.send(p) for p in pairs}


def _wait_for(settings, name: str, schema: str, want: Callable[[dict], str | None], ids: set[str],
              timeout: float = 120) -> dict[str, dict]:
    """The first record per id of ``ids`` that ``want`` maps to that id, reading ``name`` until all came."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    with TopicReader(settings.topic(name), schema, settings) as reader:
        for record in reader.decoded(idle_timeout=timeout):
            key = want(record.value)
            if key in ids:
                found.setdefault(key, record.value)
            if set(found) == ids or time.monotonic() > deadline:
                break
    assert set(found) == ids, f"{len(ids - set(found))} of {len(ids)} never came on {name}"
    return found


def _deferred_first(settings, worker: WorkerProcess, pairs: list[dict]) -> set[str]:
    """Every review candidate of ``pairs`` is deferred (none reaches review); the deferred pair ids."""
    ids = _produce(settings, pairs)
    scored = {r["pair"]["pair_id"]: r for r in wait_for_scored(settings, ids, timeout=120)}
    policy = RouterPolicy.from_settings(WorkerSettings())
    candidates = {pid for pid, r in scored.items()
                  if route(r["p"], r["gold_p"], None, policy, r["pair"]["task_category"]).kind == "review"}
    assert candidates, "the bootstrap model finds no pair uncertain; the test needs review candidates"
    assert {pid for pid, r in scored.items() if r["route"] == "deferred"} == candidates
    assert all(r["route_reason"].startswith("review budget 0") for r in scored.values() if r["route"] == "deferred")
    waiting = {r["pair"]["pair_id"] for r in read_topic(settings, topics.DEFERRED, "ScoredPair", idle=2)}
    assert waiting == candidates
    assert 'prefstream_routes_total{reason="review budget 0' in worker.metrics()
    return candidates


@contextlib.contextmanager
def _streaming(settings, seconds: float, rate: float = 5.0) -> Iterator[None]:
    """Pairs produced at ``rate`` per second in a thread, for ``seconds`` or until the block ends."""
    stop = threading.Event()

    def produce() -> None:
        with PreferenceProducer(settings) as producer:
            for i in range(int(seconds * rate)):
                if stop.wait(1 / rate):
                    return
                producer.send({"pair_id": f"stream-{i}", "prompt": f"Name a colour that goes with shade {i}.",
                               "chosen": f"Shade {i} goes well with navy.", "rejected": "Blue."})

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def test_the_budget_defers_and_a_newer_version_rescores(settings):
    from streams.kafka.announce import Announcer
    from trainers.scoring.model import RewardModel
    from trainers.storage.registry import ModelStore

    model_dir = RewardModel.default(max_length=64, seed=5).save(settings.models_dir.parent / "candidate")
    env = {"PREFSTREAM_WORKER_REVIEW_BUDGET": "0%"}
    worker = WorkerProcess(settings, extra_env=env).start()
    try:
        deferred = _deferred_first(settings, worker, _pairs(12, "budget"))
        assert not [t for t in read_topic(settings, topics.REVIEW, "ReviewTask", idle=1)
                    if t["pair"]["pair_id"] in deferred], "a deferred pair reached review before its second look"
        # A crash while the pairs wait loses none: the offsets of prefs.deferred move only with outputs.
        worker.kill9()
        worker = WorkerProcess(settings, extra_env=env).start()
        v1 = ModelStore(settings.models_dir).publish(model_dir, "current", announce=Announcer(settings))
        # The stream goes on meanwhile: every worker batch marks prefs.deferred, and the second look's rescored
        # rows must reach readers while it flows, not once it stops.
        with _streaming(settings, seconds=90):
            again = _wait_for(settings, topics.SCORED, "ScoredPair",
                              lambda r: r["pair"]["pair_id"] if r["model_version"] == v1.version else None, deferred,
                              timeout=60)
        assert {r["route"] for r in again.values()} <= {"review", "silver", "flipped", "dropped"}, \
            "a second look never defers again"
        uncertain = {pid for pid, r in again.items() if r["route"] == "review"}
        for pid in uncertain:
            assert again[pid]["route_reason"].startswith(f"still uncertain after rescoring with {v1.version}")
        if uncertain:
            tasks = _wait_for(settings, topics.REVIEW, "ReviewTask", lambda t: t["pair"]["pair_id"], uncertain)
            assert all(t["model_version"] == v1.version and "still uncertain" in t["reason"] for t in tasks.values())
    finally:
        assert worker.stop() == 0


def test_a_pair_deferred_past_the_bound_goes_to_review_with_its_reason(settings):
    worker = WorkerProcess(settings, extra_env={"PREFSTREAM_WORKER_REVIEW_BUDGET": "0/h",
                                                "PREFSTREAM_WORKER_DEFERRED_MAX_WAIT_S": "4"}).start()
    try:
        deferred = _deferred_first(settings, worker, _pairs(8, "bound"))
        tasks = _wait_for(settings, topics.REVIEW, "ReviewTask", lambda t: t["pair"]["pair_id"], deferred,
                          timeout=60)
        assert all(t["reason"].startswith("deferred for more than 4 s") for t in tasks.values())
        # The stats page counts the first pass's deferrals and the second look's routes, each as it committed.
        want = {"deferred": len(deferred), "review": len(deferred)}
        deadline = time.monotonic() + 10
        while {k: routes_counted(settings)[k] for k in want} != want and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {k: routes_counted(settings)[k] for k in want} == want
    finally:
        assert worker.stop() == 0


def test_a_partition_paused_before_a_rebalance_is_read_again_when_it_comes_back(settings):
    """librdkafka keeps a partition paused across a rebalance that gives it back (the premise, checked on a plain
    consumer); the second look's assign callback resumes it, as the blocks it kept were forgotten on revoke."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from streams.kafka.config import consumer_config, producer_config
    from streams.runtime.deferred import unpaused

    topic = settings.topic(topics.DEFERRED)
    # A short poll interval: sleeping past it makes the group take the partitions and give them back.
    conf = {"max.poll.interval.ms": 7000, "session.timeout.ms": 6000}
    plain = Consumer(consumer_config(settings, f"{settings.topic_prefix}plain") | conf)
    second = Consumer(consumer_config(settings, f"{settings.topic_prefix}second-look") | conf)
    plain.subscribe([topic])
    second.subscribe([topic], on_assign=unpaused)
    producer = Producer(producer_config(settings))

    def read(seconds: float) -> dict[str, set[int]]:
        got: dict[str, set[int]] = {"plain": set(), "second": set()}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for name, consumer in (("plain", plain), ("second", second)):
                got[name] |= {m.partition() for m in consumer.consume(10, 0.2) if not m.error()}
        return got

    producer.produce(topic, value=b"{}", partition=0)
    producer.flush(10)
    assert read(15) == {"plain": {0}, "second": {0}}, "both consumers hold partition 0"
    for consumer in (plain, second):
        consumer.pause([TopicPartition(topic, 0)])
    time.sleep(10)  # past max.poll.interval: each leaves its group and takes partition 0 back at its next poll
    read(8)
    producer.produce(topic, value=b"{}", partition=0)
    producer.flush(10)
    got = read(10)
    plain.close()
    second.close()
    assert got["plain"] == set(), "the premise: librdkafka kept the plain consumer's partition paused"
    assert got["second"] == {0}, "the second look's partition stayed paused after the rebalance"
