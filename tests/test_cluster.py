"""Several embedded brokers as one cluster (`stack up --durable --brokers N`), and workers that report
their partitions and lag: kill -9 of a broker and of a worker while pairs stream loses and duplicates nothing."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter

import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from streams.embedded.process import free_port
from streams.embedded.stack import Stack, cluster_bootstrap, with_brokers
from streams.exceptions import ConfigError
from streams.kafka.topics import CURATED
from streams.local.status import Snapshot, assignment_text, one_line, render, worker_assignment
from streams.runtime.assignment import Assignment
from streams.settings import Settings
from tests.helpers import (
    WorkerProcess,
    assert_exactly_once_in_shards,
    free_object_store_port,
    kill9,
    metric,
    processes_with_env,
    produce,
    read_topic,
    run_cli,
    short_pairs,
    wait_for_scored,
)

PARTITIONS = 6
SETTLE_S = 45.0  # a group rebalance after a kill -9 waits for the session timeout, then a join
WORKER_START_S = 300.0
# A micro-batch may run up to the stalled-batch limit (60 s) while its transaction finds the surviving broker.
LAG_SETTLED_S = 120.0


def test_cluster_bootstrap_lists_every_broker():
    assert cluster_bootstrap("127.0.0.1:9092", 3) == "127.0.0.1:9092,127.0.0.1:9093,127.0.0.1:9094"
    assert cluster_bootstrap("127.0.0.1:9100, 127.0.0.1:9300", 2) == "127.0.0.1:9100,127.0.0.1:9300"
    assert cluster_bootstrap("localhost:9092", 1) == "localhost:9092"
    with pytest.raises(ConfigError, match=r"names 2 brokers but 3 are asked for"):
        cluster_bootstrap("127.0.0.1:1,127.0.0.1:2", 3)


def test_more_than_one_broker_needs_durable(tmp_path):
    base = Settings(home=tmp_path / "home", bootstrap="127.0.0.1:9092")
    with pytest.raises(ConfigError, match="--brokers 2 needs --durable"):
        with_brokers(base, durable=False, brokers=2)
    assert with_brokers(base, durable=True, brokers=2).bootstrap == "127.0.0.1:9092,127.0.0.1:9093"
    assert with_brokers(base, durable=False, brokers=None) == base
    for command in (["stack", "up"], ["up"], ["demo"]):  # refused before anything starts
        result = run_cli([*command, "--brokers", "2"], base, check=False, timeout=60)
        message = " ".join(result.stderr.split())
        assert result.returncode != 0 and "--brokers 2 needs --durable" in message and "Traceback" not in message
    assert processes_with_env("PREFSTREAM_HOME", str(base.home)) == []


class _Positions:
    """The calls Assignment.update_lag makes, with chosen answers; ``asked`` records each committed() request."""

    def __init__(self, positions: dict[int, int], highs: dict[int, int], committed: dict[int, int]) -> None:
        self.positions, self.highs, self.committed_at = positions, highs, committed
        self.asked: list[list[int]] = []

    def committed(self, tps, timeout=None):
        self.asked.append([tp.partition for tp in tps])
        return [TopicPartition(tp.topic, tp.partition, self.committed_at.get(tp.partition, OFFSET_INVALID)) for tp in tps]

    def position(self, tps):
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(tp.partition, OFFSET_INVALID)) for tp in tps]

    def get_watermark_offsets(self, tp, cached=False):
        assert cached, "the lag must come from the fetched high watermark, never a ListOffsets request"
        return OFFSET_INVALID, self.highs.get(tp.partition, OFFSET_INVALID)


def _page() -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for s in fam.samples:
            if s.labels.get("topic", TOPIC) == TOPIC:  # this test's topic only: the registry is the process's
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


TOPIC = "assignment-test.raw"


def test_a_worker_exports_its_partitions_and_lag_and_logs_each_rebalance(caplog):
    caplog.set_level(logging.INFO, logger="streams.runtime.assignment")
    assignment = Assignment("g")
    assignment.on_assign(None, [TopicPartition(TOPIC, p) for p in (0, 1, 2)])
    assert re.search(r"rebalanced in [\d.]+ s: holds .*\[0\].*\[2\]; gained .*\[0\].*; lost none", caplog.text)
    # Partition 0: 7 records behind its position; 1: caught up; 2: no record consumed since the assignment,
    # so 3 behind the group's committed offset, asked for once.
    consumer = _Positions({0: 3, 1: 5}, {0: 10, 1: 5, 2: 9}, {2: 6})
    assert assignment.update_lag(consumer) == {(TOPIC, 0): 7, (TOPIC, 1): 0, (TOPIC, 2): 3}
    assignment.update_lag(consumer)
    assert consumer.asked == [[2]], "committed offsets are asked once per assignment, only where no position is"
    held = worker_assignment(_page())
    assert held == {0: 7.0, 1: 0.0, 2: 3.0} and assignment_text(held) == "0,1,2 (lag 10)"

    caplog.clear()
    assignment.on_revoke(None, [TopicPartition(TOPIC, p) for p in (0, 1, 2)])
    assignment.on_assign(None, [TopicPartition(TOPIC, p) for p in (1, 2, 3)])
    assert re.search(r"holds .*\[1\].*\[3\]; gained .*\[3\]; lost .*\[0\]", caplog.text), caplog.text
    assert worker_assignment(_page()) == {1: None, 2: None, 3: None}, "a lost partition must leave /metrics"
    # A partition never fetched from, and one the group never committed, have no lag: unknown, not 0.
    consumer = _Positions({}, {1: 5, 2: 9}, {1: 5, 2: 6, 3: 2})
    assert assignment.update_lag(consumer) == {(TOPIC, 1): 0, (TOPIC, 2): 3} and consumer.asked == [[1, 2, 3]]
    assignment.on_revoke(None, [TopicPartition(TOPIC, p) for p in (1, 2, 3)])
    assignment.on_assign(None, [TopicPartition(TOPIC, p) for p in (1, 2, 3)])

    snap = Snapshot(workers=2, workers_up=2, assignment={1: worker_assignment(_page()), 2: {0: 4.0, 4: None, 5: 1.0}})
    assert "partitions[worker 1: 1,2,3 · worker 2: 0,4,5 (lag 5)]" in one_line(snap, None)
    console = Console(record=True, width=200)
    console.print(render(snap, None))
    assert "partitions of prefs.raw: worker 1: 1,2,3 · worker 2: 0,4,5 (lag 5)" in console.export_text()


def _metrics(worker: WorkerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(worker.metrics()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _held(worker: WorkerProcess) -> dict[int, float | None]:
    return worker_assignment(_metrics(worker))


def _wait_for_held(what: str, workers: list[WorkerProcess], done, timeout: float = SETTLE_S) -> list[dict]:
    """Poll the workers' partitions and lag until ``done(helds)``; fail with the last ones seen."""
    deadline = time.monotonic() + timeout
    while not done(helds := [_held(w) for w in workers]):
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}; the workers hold {helds}"
        time.sleep(0.5)
    return helds


def _cluster_settings(tmp_path) -> Settings:
    home = tmp_path / "home"
    return Settings(bootstrap=f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}",
                    redis_url=f"redis://127.0.0.1:{free_port()}/0", home=home, models_dir=home / "models",
                    shards_dir=home / "shards", object_store_port=free_object_store_port(), partitions=PARTITIONS)


@pytest.mark.integration
def test_stack_up_brokers_is_one_cluster_and_status_and_down_see_every_broker(tmp_path):
    settings = _cluster_settings(tmp_path)
    first, second = (settings.model_copy(update={"bootstrap": a}) for a in settings.bootstrap.split(","))
    try:
        up = run_cli(["stack", "up", "--durable", "--brokers", "2"], settings)
        assert f"PREFSTREAM_BOOTSTRAP={settings.bootstrap}\n" in up.stdout and "2 brokers" in up.stderr
        # Written through one broker, read through the other (Tansu's object cache delays it up to 5 s).
        produce(first, short_pairs(5, "cross"))
        seen = read_topic(second, "prefs.raw", "PreferencePair", idle=8.0)
        assert sorted(p["pair_id"] for p in seen) == sorted(p["pair_id"] for p in short_pairs(5, "cross"))

        kill9(Stack(settings).brokers[1])
        status = run_cli(["stack", "status"], first, check=False)  # the home records both brokers
        assert status.returncode == 1, "a dead broker must fail `stack status`"
        assert re.search(r"broker-2\s.*\bno\b", status.stdout) and re.search(r"broker\s.*\byes\b", status.stdout)
    finally:
        down = run_cli(["stack", "down"], first, check=False)
    assert "broker: stopped" in down.stderr and "broker-2: was not running" in down.stderr
    assert processes_with_env("PREFSTREAM_HOME", str(settings.home)) == []


# Slow (`make chaos`), not in `make test`: in 3 of 7 runs the surviving worker stalled after the broker
# kill (docs/operations.md, "Several brokers"); it stays here as the check that failover works.
@pytest.mark.integration
@pytest.mark.slow
def test_two_brokers_two_workers_survive_kill_9_of_a_broker_and_a_worker(tmp_path):
    settings = _cluster_settings(tmp_path)
    home = settings.home
    workers: list[WorkerProcess] = []
    try:
        up = run_cli(["stack", "up", "--durable", "--brokers", "2"], settings)
        assert f"PREFSTREAM_BOOTSTRAP={settings.bootstrap}\n" in up.stdout, "the bootstrap must list both brokers"
        st = Stack(settings)
        assert [b.name for b in st.brokers] == ["broker", "broker-2"] and all(b.pid() for b in st.brokers)

        # Two workers share the partitions: each says which it holds, together all of them, none twice.
        workers = [WorkerProcess(settings, worker_id=f"fo{i}") for i in range(2)]
        # Both load their model at once; on 2 busy cores that took over 2 minutes.
        starting = [threading.Thread(target=w.start, kwargs={"wait_ready": WORKER_START_S}) for w in workers]
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        assert all(w.proc and w.proc.poll() is None for w in workers), "a worker did not start"
        _wait_for_held("the two workers split the partitions", workers,
                       lambda helds: all(helds) and sorted(p for h in helds for p in h) == list(range(PARTITIONS)))

        pairs = short_pairs(400, "failover")
        ids = {p["pair_id"] for p in pairs}
        chunks = [pairs[i::4] for i in range(4)]
        produced: set[str] = set()
        kills: list[str] = []

        def stream() -> None:  # pairs keep coming while the broker and the worker die
            for i, chunk in enumerate(chunks):
                produced.update(produce(settings, chunk))
                if i == 0:
                    # Mid-stream: both workers are consuming when the broker dies.
                    _wait_for_held("both workers consumed", workers,
                                   lambda helds: all(any(v is not None for v in h.values()) for h in helds))
                    kill9(st.brokers[1])
                    kills.append("broker-2")
                elif i == 1:
                    workers[1].kill9()
                    kills.append("worker fo1")
                time.sleep(1.0)

        producer = threading.Thread(target=stream)
        producer.start()
        producer.join(120)
        assert kills == ["broker-2", "worker fo1"] and produced == ids

        try:
            records = wait_for_scored(settings, ids, timeout=180)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the survivor holds {_held(workers[0])} and consumed "
                                 f"{metric(workers[0].metrics(), 'prefstream_records_in_total')} records") from exc
        counts = Counter((r["pair"]["pair_id"], r["model_version"]) for r in records)
        dupes = [k for k, v in counts.items() if v > 1]
        assert not dupes, f"{len(dupes)} pairs scored twice (read_committed), e.g. {dupes[:3]}"
        assert {pid for pid, _ in counts} == ids

        # The survivor took the dead worker's partitions and, with the stream drained, is behind on none.
        survivor = workers[0]
        # The lag gauges are refreshed between micro-batches, so a batch slowed by the failover delays them.
        [held] = _wait_for_held("the survivor holds every partition with lag 0", [survivor],
                                lambda helds: sorted(helds[0]) == list(range(PARTITIONS))
                                and all(v == 0 for v in helds[0].values()), timeout=LAG_SETTLED_S)
        assert assignment_text(held) == "0,1,2,3,4,5 (lag 0)"
        log = survivor.log.read_text()
        assert re.search(r"rebalanced in [\d.]+ s: holds .*; gained .*\[\d\]", log), log[-2000:]

        curated = read_topic(settings, CURATED, "CuratedPair")
        assert len({c["pair"]["pair_id"] for c in curated}) == len(curated)
        assert_exactly_once_in_shards(settings, {c["pair"]["pair_id"] for c in curated})

        status = run_cli(["stack", "status"], settings, check=False)
        assert status.returncode == 1, "a dead broker must fail `stack status`"
        assert re.search(r"broker-2\s.*\bno\b", status.stdout) and re.search(r"broker\s.*\byes\b", status.stdout)
    finally:
        for w in workers:
            w.stop()
        down = run_cli(["stack", "down"], settings, check=False)
        assert "broker-2:" in down.stderr
    assert processes_with_env("PREFSTREAM_HOME", str(home)) == []
