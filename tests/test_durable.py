"""The durable embedded stack (Tansu on SeaweedFS): records and committed offsets survive kill -9 of the
broker and of the object store, the choice sticks to the home, and `up` resumes where it stopped."""

from __future__ import annotations

import gc
import re
import stat
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from streams.embedded.process import free_port
from streams.embedded.stack import DURABLE_STORAGE, Stack
from streams.kafka.admin import admin
from streams.kafka.config import consumer_config, producer_config
from streams.local.generate import GenerateConfig, generate
from streams.settings import Settings
from tests.helpers import free_object_store_port, kill9, processes_with_env, read_topic, run_cli, run_up_once

pytestmark = pytest.mark.integration

TOPIC = "durable.check"
PARTITIONS = 3
RECORDS = 300
CONSUMED = 200
GROUP = "durable-check"
IDLE_S = 3.0  # a reader is done after this long without a record ...
FIRST_RECORD_S = 30.0  # ... once it has one; the first may wait for a group join or a restarted server


def _settings(tmp_path, durable: bool) -> Settings:
    home = tmp_path / "home"
    return Settings(bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                    home=home, models_dir=home / "models", shards_dir=home / "shards", durable=durable,
                    object_store_port=free_object_store_port())


@pytest.fixture
def durable_stack(tmp_path):
    """A private durable stack with RECORDS records in TOPIC and CONSUMED of them committed by GROUP."""
    st = Stack(_settings(tmp_path, durable=True))
    st.up()
    try:
        client = admin(st.settings)  # held: a collected client cancels its pending request
        client.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])[TOPIC].result(30)
        _produce(st.settings, range(RECORDS))
        yield st
    finally:
        gc.collect()  # idle clients first, so they do not log the broker going away
        st.down()
    assert processes_with_env("PREFSTREAM_HOME", str(st.settings.home)) == []
    assert st.broker.pid() is None and st.object_store.process.pid() is None


def _produce(settings: Settings, numbers) -> None:
    producer = Producer(producer_config(settings))
    for i in numbers:
        producer.produce(TOPIC, key=str(i).encode(), value=f"r{i}".encode())
    assert producer.flush(30) == 0, "records were not acknowledged"


def _records(settings: Settings) -> list[str]:
    """Every record of TOPIC, read from the start of each partition without a group."""
    reader = Consumer(consumer_config(settings, None))
    reader.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
    values, last = [], time.monotonic()
    while time.monotonic() - last < (IDLE_S if values else FIRST_RECORD_S):
        msg = reader.poll(0.5)
        if msg is not None and not msg.error():
            values.append(msg.value().decode())
            last = time.monotonic()
    reader.close()
    return values


def _consume(settings: Settings, limit: int | None = None) -> list[str]:
    """Read as GROUP from its committed offsets (up to ``limit`` records, else until idle) and commit."""
    consumer = Consumer(consumer_config(settings, GROUP))
    consumer.subscribe([TOPIC])
    values, last = [], time.monotonic()
    while (limit is None or len(values) < limit) and time.monotonic() - last < (IDLE_S if values else FIRST_RECORD_S):
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            values.append(msg.value().decode())
            last = time.monotonic()
    if values:
        consumer.commit(offsets=consumer.position(consumer.assignment()), asynchronous=False)
    consumer.close()
    return values


def _committed(settings: Settings) -> dict[int, int]:
    consumer = Consumer(consumer_config(settings, GROUP))
    offsets = consumer.committed([TopicPartition(TOPIC, p) for p in range(PARTITIONS)], timeout=10)
    consumer.close()
    return {tp.partition: tp.offset for tp in offsets}


def _assert_kept(st: Stack, committed: dict[int, int]) -> None:
    assert sorted(_records(st.settings)) == sorted(f"r{i}" for i in range(RECORDS)), "a record was lost"
    assert _committed(st.settings) == committed, "the group's committed offsets changed"


def test_records_and_offsets_survive_kill_9_of_the_broker(durable_stack: Stack):
    st = durable_stack
    first = _consume(st.settings, CONSUMED)
    committed = _committed(st.settings)
    assert len(first) == CONSUMED and sum(committed.values()) == CONSUMED

    kill9(st.broker)
    st.up()
    _assert_kept(st, committed)
    rest = _consume(st.settings)
    assert sorted(first + rest) == sorted(f"r{i}" for i in range(RECORDS)), "the group did not resume at its offsets"


def test_records_and_offsets_survive_kill_9_of_the_object_store(durable_stack: Stack):
    st = durable_stack
    _consume(st.settings, CONSUMED)
    committed = _committed(st.settings)

    # The store alone: up starts it again; the broker, left running, carries on.
    broker_pid = st.broker.pid()
    kill9(st.object_store.process)
    st.up()
    assert st.broker.pid() == broker_pid
    _assert_kept(st, committed)

    # Both at once, as a machine crash would.
    kill9(st.broker)
    kill9(st.object_store.process)
    st.up()
    _assert_kept(st, committed)
    _produce(st.settings, range(RECORDS, RECORDS + 10))  # and it takes new records
    assert len(_records(st.settings)) == RECORDS + 10


def test_stack_up_durable_sticks_to_the_home_and_down_stops_all(tmp_path):
    settings = _settings(tmp_path, durable=False)
    st = Stack(settings)
    try:
        up = run_cli(["stack", "up", "--durable"], settings)
        assert f"broker storage: {DURABLE_STORAGE}" in up.stderr and "(durable)" in up.stderr
        assert DURABLE_STORAGE in st.broker.command_line()
        status = run_cli(["stack", "status"], settings)
        assert re.search(r"objectstore\s.*yes", status.stdout), status.stdout
        assert stat.S_IMODE(st.object_store.config.stat().st_mode) == 0o600
        pids = (st.broker.pid(), st.object_store.process.pid(), st.redis.pid())

        again = run_cli(["stack", "up"], settings)  # no --durable: the home stays durable
        assert "(durable)" in again.stderr and "0 created" in again.stderr
        assert (st.broker.pid(), st.object_store.process.pid(), st.redis.pid()) == pids

        down = run_cli(["stack", "down"], settings)
        assert "objectstore: stopped" in down.stderr and "broker: stopped" in down.stderr
        assert processes_with_env("PREFSTREAM_HOME", str(settings.home)) == []
        status = run_cli(["stack", "status"], settings, check=False)
        assert status.returncode == 1 and "objectstore" in status.stdout

        restarted = run_cli(["stack", "up"], settings)
        assert "0 created" in restarted.stderr, "the topics were not kept across stack down and up"
        assert DURABLE_STORAGE in st.broker.command_line()
    finally:
        run_cli(["stack", "down"], settings)
    assert processes_with_env("PREFSTREAM_HOME", str(settings.home)) == []


def test_durable_is_refused_while_an_in_memory_broker_runs(tmp_path):
    settings = _settings(tmp_path, durable=False)
    try:
        run_cli(["stack", "up"], settings)
        result = run_cli(["stack", "up", "--durable"], settings, check=False)
        message = " ".join(result.stderr.split())  # rich wraps long lines
        assert result.returncode == 1 and "Traceback" not in message
        assert "runs with its data in memory" in message and "`prefstream stack down` first" in message
        assert not Stack(settings).storage_file.exists(), "a refused start must not mark the home durable"
    finally:
        run_cli(["stack", "down"], settings)


def test_up_durable_resumes_after_its_servers_are_killed(tmp_path):
    settings = _settings(tmp_path, durable=False)
    home = settings.home
    pairs = list(generate(GenerateConfig(n=12, seed=7, categories=("arithmetic", "capital_cities"))))

    # 1. `up --durable` starts the durable stack and stops it all at Ctrl-C.
    log = tmp_path / "up1.log"
    run_up_once(settings, log, pairs[:5], 5, "--durable")
    assert "The broker is durable" in log.read_text()
    assert processes_with_env("PREFSTREAM_HOME", str(home)) == [], "up left processes behind"

    # 2. A crash of the servers (kill -9 of broker, object store and Redis) loses nothing either.
    st = Stack(settings)
    st.up()
    for server in (st.broker, st.object_store.process, st.redis):
        kill9(server)

    # 3. A plain `up` on the home is durable and resumes from the committed offsets: only the new
    # pairs are scored, and every pair is on prefs.scored exactly once.
    log = tmp_path / "up2.log"
    run_up_once(settings, log, pairs[5:], 7)
    assert "The broker is durable" in log.read_text()
    try:
        st.up()
        ids = [r["pair"]["pair_id"] for r in read_topic(settings, "prefs.scored", "ScoredPair")]
        assert sorted(ids) == sorted(p["pair_id"] for p in pairs), "a pair was lost or scored twice across restarts"
    finally:
        gc.collect()
        st.down()
    assert processes_with_env("PREFSTREAM_HOME", str(home)) == []
