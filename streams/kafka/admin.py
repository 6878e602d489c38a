"""Topic provisioning from the one table in topics.py. Idempotent: existing topics are left alone,
except that ``grow`` adds partitions to data topics with fewer than PREFSTREAM_PARTITIONS."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from streams.exceptions import BrokerError
from streams.kafka.config import admin_config
from streams.kafka.topics import TOPICS, TopicSpec
from streams.settings import Settings

ADMIN_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    action: str  # created | exists | grown | fewer (than wanted, not grown) | more (than wanted: Kafka cannot shrink)
    wanted: int = 0


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


def ensure_topics(settings: Settings, specs: tuple[TopicSpec, ...] = TOPICS, grow: bool = False) -> list[TopicState]:
    """Create every topic in ``specs`` that does not exist yet (names get the settings' prefix); with
    ``grow``, add partitions to data topics that have fewer than the settings ask for."""
    have = existing_topics(settings)
    states, missing, short = [], [], []
    for spec in specs:
        name, wanted = settings.topic(spec.name), spec.partitions_in(settings)
        if name not in have:
            missing.append(spec)
        elif have[name] == wanted:
            states.append(TopicState(name, have[name], "exists", wanted))
        elif have[name] > wanted:
            states.append(TopicState(name, have[name], "more", wanted))
        elif grow:
            short.append(spec)
        else:
            states.append(TopicState(name, have[name], "fewer", wanted))
    client = admin(settings)  # keep a reference: the futures fail if the client is collected
    if missing:
        new = [NewTopic(settings.topic(s.name), num_partitions=s.partitions_in(settings), replication_factor=-1,
                        config=dict(s.config)) for s in missing]
        futures = client.create_topics(new, operation_timeout=ADMIN_TIMEOUT_S, request_timeout=ADMIN_TIMEOUT_S)
        for spec_, (name, fut) in zip(missing, futures.items(), strict=True):
            try:
                fut.result()
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() != err.TOPIC_ALREADY_EXISTS:  # lost a race with another provisioner: fine
                    raise BrokerError(f"could not create topic {name}: {err.str()}") from exc
            states.append(TopicState(name, spec_.partitions_in(settings), "created", spec_.partitions_in(settings)))
    if short:
        new_parts = [NewPartitions(settings.topic(s.name), s.partitions_in(settings)) for s in short]
        futures = client.create_partitions(new_parts, operation_timeout=ADMIN_TIMEOUT_S, request_timeout=ADMIN_TIMEOUT_S)
        for spec_, (name, fut) in zip(short, futures.items(), strict=True):
            try:
                fut.result()
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() == err._UNSUPPORTED_FEATURE or "not supported" in err.str():
                    wanted = spec_.partitions_in(settings)
                    raise BrokerError(
                        f"the broker at {settings.bootstrap} cannot add partitions to {name} (it does not support "
                        f"CreatePartitions; Tansu, the embedded broker, does not). To run with {wanted} partitions, "
                        "move to new topics: `PREFSTREAM_TOPIC_PREFIX=<new>. PREFSTREAM_PARTITIONS="
                        f"{wanted} prefstream topics create`, copy the pairs (`prefstream consume prefs.raw > raw.jsonl`, "
                        "then `PREFSTREAM_TOPIC_PREFIX=<new>. prefstream produce raw.jsonl`) and restart the workers "
                        "with the new prefix, which score them again (docs/operations.md, \"Partitions\"). An "
                        "in-memory embedded stack can instead be restarted empty: `prefstream stack down`, then "
                        f"`PREFSTREAM_PARTITIONS={wanted} prefstream stack up`") from exc
                raise BrokerError(f"could not add partitions to {name}: {err.str()}") from exc
            states.append(TopicState(name, spec_.partitions_in(settings), "grown", spec_.partitions_in(settings)))
    return states
