"""The guarantees that matter, on Apache Kafka (one KRaft broker from `stack up --engine kafka`).

The rest of the suite runs on the embedded broker (Tansu), which delivers aborted records to
read_committed consumers and reports "latest" offsets short of the end. Here the same stages run on
the broker users deploy: aborted records are hidden, so the committed-only filter
(streams/kafka/committed.py) drops nothing and the shards come out the same; a worker killed with
kill -9 loses and duplicates nothing; bad input is dead-lettered; lag from ListOffsets is exact.
Skipped (with the reason) where java or mvn is missing.
"""

from __future__ import annotations

import random
import shutil
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from pydantic import SecretStr

from streams.kafka import topics
from streams.kafka.config import admin_config, consumer_config, producer_config
from streams.kafka.reader import read_topic
from streams.kafka.transactions import BatchTransactions
from streams.settings import Settings, WorkerSettings
from tests import test_committed_only as committed_only
from tests import test_pipeline as pipeline
from tests.helpers import WorkerProcess, aborting_producer, every_record, raw_batch, run_cli, wait_for_scored

pytestmark = pytest.mark.integration


def test_stack_status_shows_the_kafka_broker_and_topics_are_replicated_by_the_stack(kafka_settings):
    status = run_cli(["stack", "status"], kafka_settings).stdout
    assert "kafka-1" in status and "redis" in status and "no" not in status.split()
    meta = AdminClient(admin_config(kafka_settings)).list_topics(timeout=10)
    assert list(meta.brokers) == [1], "one KRaft node (id 1) answers metadata"
    raw = meta.topics[kafka_settings.topic(topics.RAW)]
    assert len(raw.partitions) == kafka_settings.partitions
    assert {len(p.replicas) for p in raw.partitions.values()} == {1}, "replication factor min(3, 1 broker)"


def test_offsets_sent_in_an_aborted_or_fenced_transaction_never_become_the_committed_offsets(kafka_settings):
    committed_only.test_premise_offsets_sent_in_an_aborted_transaction_never_become_the_committed_offsets(
        kafka_settings)


def test_aborted_rows_are_hidden_and_the_shards_come_out_as_on_the_embedded_broker(kafka_settings):
    """The Tansu scenario of test_committed_only, on Kafka: same shard rows, and the filter drops nothing."""
    settings = kafka_settings
    x, y = committed_only._pairs(2)
    consumer, msgs = raw_batch(settings, [x, y], f"{settings.topic_prefix}worker")
    marked = [settings.topic(t) for t in (topics.SCORED, topics.REVIEW, topics.CURATED, topics.DLQ)]
    txn = BatchTransactions(settings, f"{settings.topic_prefix}w0", make_producer=aborting_producer(1), marked=marked)
    first = [committed_only._encode(settings, topics.CURATED, "CuratedPair", p["pair_id"],
                                    committed_only._curated(p, "silver")) for p in (x, y)]
    assert not txn.commit(consumer, first, msgs)
    msgs = committed_only._again(consumer, 2)
    assert [m.offset() for m in msgs] == [0, 1], "the rewind reads the batch again from the committed offset"
    second = [committed_only._encode(settings, topics.CURATED, "CuratedPair", x["pair_id"],
                                     committed_only._curated(x, "flipped"))]
    assert txn.commit(consumer, second, msgs)
    assert txn.anchor(consumer)
    consumer.close()

    delivered = [m for m in every_record(settings, topics.CURATED) if m.value() is not None]
    assert [m.key().decode() for m in delivered] == [x["pair_id"]], "Kafka hides the aborted silver rows"
    writer = committed_only._run_writer(settings, lambda w: committed_only._shard_rows(settings))
    rows = committed_only._shard_rows(settings)
    assert [(r["pair"]["pair_id"], r["split"]) for r in rows] == [(x["pair_id"], "flipped")]
    assert writer.filter.dropped == 0 and writer.duplicates == 0, "the workaround has nothing to drop on Kafka"
    assert [r.value["split"] for r in read_topic(settings, topics.CURATED, "CuratedPair")] == ["flipped"]


def _committed_lag(settings: Settings, group: str, topic: str) -> tuple[int, int]:
    """(records in ``topic`` by ListOffsets latest, their lag behind ``group``'s committed offsets), as an
    autoscaler (KEDA's Kafka scaler) computes them."""
    client = AdminClient(admin_config(settings))
    meta = client.list_topics(topic, timeout=10).topics[topic]
    parts = [TopicPartition(topic, p) for p in meta.partitions]
    latest = {tp.partition: f.result().offset
              for tp, f in client.list_offsets({tp: OffsetSpec.latest() for tp in parts}).items()}
    consumer = Consumer(consumer_config(settings, group))
    try:
        committed = {tp.partition: max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()
    return sum(latest.values()), sum(latest[p] - committed[p] for p in latest)


def test_consumer_lag_from_list_offsets_is_exact(kafka_settings):
    settings = kafka_settings
    topic, group = settings.topic(topics.RAW), f"{settings.topic_prefix}lagging"
    producer = Producer(producer_config(settings, **{"linger.ms": 200}))
    for i in range(160):  # a few large batches: where Tansu reports the start of the last one
        producer.produce(topic, value=b"x" * 100, key=str(i).encode())
    assert producer.flush(10) == 0
    consumer = Consumer(consumer_config(settings, group))
    consumer.subscribe([topic])
    taken: list = []
    deadline = time.monotonic() + 30
    while len(taken) < 60 and time.monotonic() < deadline:
        taken += [m for m in consumer.consume(60 - len(taken), 1.0) if not m.error()]
    ends: dict[int, int] = {}
    for m in taken:
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    consumer.commit(offsets=[TopicPartition(topic, p, end) for p, end in ends.items()], asynchronous=False)
    consumer.close()
    assert len(taken) == 60
    assert _committed_lag(settings, group, topic) == (160, 100)


def _produce_raw(settings: Settings, records: list[tuple]) -> None:
    producer = Producer(producer_config(settings))
    for i, (value, headers, _reason) in enumerate(records):
        producer.produce(settings.topic(topics.RAW), value=value, headers=headers, key=f"bad-{i}".encode())
    assert producer.flush(30) == 0


def test_a_worker_killed_with_kill_9_loses_and_duplicates_nothing_dead_letters_once_and_leaves_no_lag(
        kafka_settings):
    """Pairs and hostile records stream while the worker is killed with kill -9 and restarted: every pair
    scored once, every bad record dead-lettered once with its reason, and no backlog left by ListOffsets."""
    settings = kafka_settings
    pairs = pipeline.short_pairs(100, "kcrash") + pipeline.objective_pairs(10, seed=3)
    bad = pipeline.bad_records(settings, 30, huge=1)
    expected = Counter(reason for _, _, reason in bad if reason)
    dup = {"dup-1"} if any(reason is None for _, _, reason in bad) else set()  # a valid pair, sent again
    ids = {p["pair_id"] for p in pairs} | dup
    worker = WorkerProcess(settings, worker_id="crashy").start()
    produced = pipeline.produce(settings, pairs[:60])
    _produce_raw(settings, bad[:15])
    time.sleep(random.Random(2).uniform(2, 4))
    worker.kill9()
    produced |= pipeline.produce(settings, pairs[60:])
    _produce_raw(settings, bad[15:])
    worker = WorkerProcess(settings, worker_id="crashy").start()
    try:
        assert produced | dup == ids
        records = wait_for_scored(settings, ids, timeout=300)
        dupes = [k for k, v in Counter(r["pair"]["pair_id"] for r in records).items() if v > 1]
        assert not dupes, f"{len(dupes)} pairs twice in prefs.scored (read_committed), e.g. {dupes[:3]}"
        curated = [r.value for r in read_topic(settings, topics.CURATED, "CuratedPair")]
        assert len({c["pair"]["pair_id"] for c in curated}) == len(curated)
        pipeline.assert_exactly_once_in_shards(settings, {c["pair"]["pair_id"] for c in curated})
        deadline = time.monotonic() + 60
        while len(dlq := [r.value for r in read_topic(settings, topics.DLQ, "DeadLetter", idle_timeout=2)]) \
                < sum(expected.values()) and time.monotonic() < deadline:
            time.sleep(1)
        assert Counter(d["reason"] for d in dlq) == expected
        sources = Counter((d["source_partition"], d["source_offset"]) for d in dlq)
        assert max(sources.values()) == 1, "a bad record dead-lettered twice"
        # Once the worker has committed everything, an autoscaler reading ListOffsets sees no backlog.
        group, raw = f"{settings.topic_prefix}{WorkerSettings().group}", settings.topic(topics.RAW)
        while (lag := _committed_lag(settings, group, raw)) != (len(pairs) + len(bad), 0) \
                and time.monotonic() < deadline:
            time.sleep(1)
        assert lag == (len(pairs) + len(bad), 0)
    finally:
        assert worker.stop() == 0


@pytest.mark.slow
def test_kill_9_three_times_on_kafka(kafka_settings):
    pipeline.test_kill_9_three_times_loses_and_duplicates_nothing(kafka_settings, 3000)


@pytest.mark.slow
def test_bad_input_is_dead_lettered_and_valid_pairs_still_flow(kafka_settings):
    pipeline.test_bad_input_goes_to_the_dlq_and_valid_pairs_still_flow(kafka_settings)


def test_a_missing_java_or_maven_is_named_with_how_to_install_it(tmp_path, monkeypatch):
    from streams.embedded.apache_kafka import fetch_jars
    from streams.exceptions import BinaryNotFoundError

    monkeypatch.setenv("PATH", str(tmp_path))  # neither java nor mvn on it
    with pytest.raises(BinaryNotFoundError, match=r"`java`.*apt-get install openjdk-17"):
        fetch_jars(tmp_path / "cache", "4.4.0")


@pytest.mark.skipif(shutil.which("mvn") is None or shutil.which("java") is None, reason="needs java and mvn")
def test_a_version_maven_cannot_fetch_fails_with_what_to_check_and_leaves_no_jars(tmp_path):
    from streams.embedded.apache_kafka import fetch_jars, jars_dir
    from streams.exceptions import StackError

    with pytest.raises(StackError, match=r"could not fetch Apache Kafka 0\.0\.404.*PREFSTREAM_KAFKA_VERSION"):
        fetch_jars(tmp_path, "0.0.404")
    assert not jars_dir(tmp_path, "0.0.404").exists(), "a failed fetch must not look like a cache"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mvn") is None or shutil.which("java") is None, reason="needs java and mvn")
def test_three_kraft_brokers_from_the_cli_survive_kill_9_of_one_with_every_pair_scored_once(tmp_path):
    import os
    import signal

    from streams.embedded.process import free_port

    settings = Settings(bootstrap=",".join(f"127.0.0.1:{free_port()}" for _ in range(3)),
                        redis_url=f"redis://127.0.0.1:{free_port()}/0", home=tmp_path / "home")
    up = run_cli(["stack", "up", "--engine", "kafka", "--brokers", "3"], settings, timeout=600)
    assert f"PREFSTREAM_BOOTSTRAP={settings.bootstrap}" in up.stdout
    worker = None
    try:
        meta = AdminClient(admin_config(settings)).list_topics(timeout=10)
        assert sorted(meta.brokers) == [1, 2, 3]
        raw = meta.topics[settings.topic(topics.RAW)]
        assert {len(p.replicas) for p in raw.partitions.values()} == {3}, "replication factor min(3, 3)"
        pairs = pipeline.short_pairs(300, "kbroker")
        ids = {p["pair_id"] for p in pairs}
        worker = WorkerProcess(settings, worker_id="w0").start()
        produced = pipeline.produce(settings, pairs[:150])
        time.sleep(3)
        os.kill(int((settings.home / "kafka-2.pid").read_text()), signal.SIGKILL)
        produced |= pipeline.produce(settings, pairs[150:])
        assert produced == ids
        records = wait_for_scored(settings, ids, timeout=600)
        dupes = [k for k, v in Counter(r["pair"]["pair_id"] for r in records).items() if v > 1]
        assert not dupes, f"{len(dupes)} pairs twice in prefs.scored after a broker died, e.g. {dupes[:3]}"
        curated = [r.value for r in read_topic(settings, topics.CURATED, "CuratedPair")]
        pipeline.assert_exactly_once_in_shards(settings, {c["pair"]["pair_id"] for c in curated})
        status = run_cli(["stack", "status"], settings, check=False)
        assert status.returncode == 1 and "kafka-2" in status.stdout, "status shows the dead broker"
    finally:
        if worker is not None:
            worker.stop()
        run_cli(["stack", "down"], settings)


# ------------------------------------------------------------------------------ SASL/SCRAM and ACLs
_ACL_TYPES = {"topic": "TOPIC", "group": "GROUP", "transactionalId": "TRANSACTIONAL_ID"}


def _grant_strimzi_users(admin: Settings, passwords: dict[str, str]) -> None:
    """Create each component's SCRAM user with exactly the ACLs of its generated Strimzi KafkaUser
    (streams/deploy.py, from topics.ACCESS), so this broker enforces what the k8s manifests declare."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    from streams.deploy import strimzi_user, user_name

    client = AdminClient(admin_config(admin))
    upserts = [UserScramCredentialUpsertion(user_name(c), ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096),
                                            password.encode()) for c, password in passwords.items()]
    for future in client.alter_user_scram_credentials(upserts).values():
        future.result()
    bindings = [
        AclBinding(ResourceType[_ACL_TYPES[acl["resource"]["type"]]], acl["resource"]["name"],
                   ResourcePatternType.PREFIXED if acl["resource"]["patternType"] == "prefix" else ResourcePatternType.LITERAL,
                   f"User:{user_name(c)}", "*", AclOperation[op.upper()], AclPermissionType.ALLOW)
        for c in passwords for acl in strimzi_user(c)["spec"]["authorization"]["acls"] for op in acl["operations"]]
    for future in client.create_acls(bindings).values():
        future.result()


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory):
    """A KRaft broker that requires SCRAM-SHA-512 and authorizes by ACL, with one user per component."""
    import secrets

    from streams.embedded.apache_kafka import ADMIN_USER, SCRAM, KafkaCluster
    from streams.embedded.process import free_port
    from streams.kafka.admin import broker_answers, ensure_topics
    from streams.kafka.topics import ACCESS

    if shutil.which("java") is None or shutil.which("mvn") is None:
        pytest.skip("the Apache Kafka tests need java and mvn on PATH (apt-get install openjdk-17-jre-headless maven)")
    base = Settings()
    cluster = KafkaCluster(tmp_path_factory.mktemp("sasl-kafka"), [("127.0.0.1", free_port())], base.kafka_cache,
                           base.kafka_version, admin_password=secrets.token_urlsafe(16))

    def as_user(user: str, password: str) -> Settings:
        return Settings(bootstrap=cluster.bootstrap, security_protocol="SASL_PLAINTEXT", sasl_mechanism=SCRAM,
                        sasl_username=user, sasl_password=password)

    admin = as_user(ADMIN_USER, cluster.admin_password)
    try:
        cluster.start(lambda host, port: broker_answers(admin, timeout=0.5))
        ensure_topics(admin)
        passwords = {c: secrets.token_urlsafe(16) for c in ACCESS}
        _grant_strimzi_users(admin, passwords)
        from streams.deploy import user_name

        yield {c: as_user(user_name(c), p) for c, p in passwords.items()}
    finally:
        cluster.stop()


def _produce_once(settings: Settings, topic: str, timeout_ms: int = 10000) -> str | None:
    """Produce one record to ``topic``; the delivery error's name, or None when the broker took it."""
    errors: list = []
    producer = Producer(producer_config(settings, **{"message.timeout.ms": timeout_ms}))
    producer.produce(topic, key=b"k", value=b"x", on_delivery=lambda err, _msg: errors.append(err))  # compacted: keyed
    producer.flush(timeout_ms / 1000 + 5)
    assert len(errors) == 1, "no delivery report"
    return errors[0].name() if errors[0] is not None else None


def test_a_component_cannot_write_a_topic_its_user_has_no_acl_for(sasl_kafka):
    controller, app = sasl_kafka["controller"], sasl_kafka["app"]
    # The table says: the controller writes models.versions only; applications write prefs.raw only.
    assert _produce_once(controller, topics.MODEL_VERSIONS) is None
    assert _produce_once(controller, topics.SCORED) == "TOPIC_AUTHORIZATION_FAILED"
    assert _produce_once(app, topics.RAW) is None
    assert _produce_once(app, topics.MODEL_VERSIONS) == "TOPIC_AUTHORIZATION_FAILED"
    wrong = controller.model_copy(update={"sasl_password": SecretStr("not-the-password")})
    assert _produce_once(wrong, topics.MODEL_VERSIONS, timeout_ms=3000) is not None, "a wrong password must not get in"
