"""Announcing model versions on the compacted `models.versions` topic (key = role), signed.

Each record is signed with the announcement key (Ed25519, PREFSTREAM_ANNOUNCE_SIGNING_KEY or
PREFSTREAM_HOME/keys/announce.key; streams/keys.py): workers hold only its public key and serve
nothing else (streams/runtime/announcements.py).
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer

from schemas.wire import ValueCodec
from streams.exceptions import DeliveryError
from streams.kafka import topics
from streams.kafka.admin import broker_answers
from streams.kafka.config import producer_config
from streams.keys import announce_signer
from streams.settings import Settings
from streams.signing import Signer, sign_headers

ANNOUNCE_TIMEOUT_S = 15.0


class Announcer:
    """Callable given to ModelStore.publish/promote/rollback; writes the signed ModelVersion record.

    Made without a signing key it raises ConfigError at once, before a retrain spends its time.
    """

    def __init__(self, settings: Settings, signer: Signer | None = None) -> None:
        self.settings = settings
        self.topic = settings.topic(topics.MODEL_VERSIONS)
        self.codec = ValueCodec(settings.schema_registry_url)
        self.signer = signer or announce_signer(settings)
        # Made now, not per record: a new idempotent producer connects and acquires its producer id first
        # (0.5-1 s on the embedded broker), and that would fall between a record's announced_at and the
        # workers seeing it. Made ahead (a retrain job makes its announcer before training), it is ready.
        self.producer = Producer(producer_config(settings))

    def __call__(self, record: dict[str, Any]) -> None:
        value, encoded = self.codec.encode("ModelVersion", record, self.topic)
        # Signed as the workers decode it (every schema field), not as given.
        decoded = self.codec.decode("ModelVersion", value, encoded, self.topic)
        headers: list[tuple[str, str | bytes | None]] = [*encoded, *sign_headers("ModelVersion", decoded, self.signer)]
        producer = self.producer
        errors: list[str] = []
        producer.produce(self.topic, key=record["role"].encode(), value=value, headers=headers,
                         on_delivery=lambda err, _msg: errors.append(err.str()) if err else None)
        if producer.flush(ANNOUNCE_TIMEOUT_S) or errors:
            raise DeliveryError(f"could not announce {record['version']} on {self.topic}: {errors or 'timed out'}")


def announcer_if_reachable(settings: Settings) -> Announcer | None:
    """An Announcer when a broker answers, else None (the model store works without Kafka)."""
    return Announcer(settings) if broker_answers(settings, timeout=2.0) else None
