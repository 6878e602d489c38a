"""Topic provisioning from the one table in topics.py. Idempotent: existing topics are left alone."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streams.exceptions import BrokerError
from streams.kafka.config import admin_config
from streams.kafka.topics import TOPICS, TopicSpec
from streams.settings import Settings

ADMIN_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    action: str  # created | exists | mismatch


def admin(settings: Settings) -> AdminClient:
    return AdminClient(admin_config(settings))


def broker_answers(settings: Settings, timeout: float = 1.0) -> bool:
    try:
        # log_level 0: 'connection refused' while a broker starts is expected, not worth a log line.
        AdminClient(admin_config(settings) | {"log_level": 0}).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def existing_topics(settings: Settings, timeout: float = ADMIN_TIMEOUT_S) -> dict[str, int]:
    try:
        meta = admin(settings).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot reach Kafka at {settings.bootstrap} ({exc.args[0]}); start it with `prefstream stack up` "
            "or point PREFSTREAM_BOOTSTRAP at your cluster"
        ) from exc
    return {name: len(t.partitions) for name, t in meta.topics.items()}


def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = TOPICS) -> list[TopicState]:
    """Create every topic in ``specs`` that does not exist yet (names get the settings' prefix)."""
    have = existing_topics(settings)
    missing = [s for s in specs if settings.topic(s.name) not in have]
    states = [
        TopicState(settings.topic(s.name), have[settings.topic(s.name)],
                   "exists" if have[settings.topic(s.name)] == s.partitions else "mismatch")
        for s in specs if settings.topic(s.name) in have
    ]
    if missing:
        new = [NewTopic(settings.topic(s.name), num_partitions=s.partitions, replication_factor=-1, config=dict(s.config))
               for s in missing]
        client = admin(settings)  # keep a reference: the futures fail if the client is collected
        futures = client.create_topics(new, operation_timeout=ADMIN_TIMEOUT_S, request_timeout=ADMIN_TIMEOUT_S)
        for spec_, (name, fut) in zip(missing, futures.items(), strict=True):
            try:
                fut.result()
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() != err.TOPIC_ALREADY_EXISTS:  # lost a race with another provisioner: fine
                    raise BrokerError(f"could not create topic {name}: {err.str()}") from exc
            states.append(TopicState(name, spec_.partitions, "created"))
    return states
