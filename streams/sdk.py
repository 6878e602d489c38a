"""Client SDK for applications: publish preference pairs, read scores.

    from streams.sdk import PreferenceProducer, ScoreConsumer

    with PreferenceProducer() as producer:
        producer.send({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    for scored in ScoreConsumer(group="my-dashboard"):
        print(scored["pair"]["pair_id"], scored["p"])
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from confluent_kafka import KafkaException, Producer

from schemas.pairs import validate_pair
from schemas.wire import ValueCodec
from streams.exceptions import BrokerError, DeliveryError
from streams.kafka import topics
from streams.kafka.config import producer_config
from streams.kafka.reader import DEFAULT_DEDUPE_MAX, TopicReader
from streams.keys import producer_signer
from streams.runtime.curation.trust import sign_pair
from streams.settings import Settings, get_settings
from streams.signing import HmacKey

__all__ = ["PreferenceProducer", "ScoreConsumer", "TopicReader"]

DEFAULT_FLUSH_TIMEOUT_S = 30.0


class PreferenceProducer:
    """Validates pairs and writes them to ``prefs.raw`` (Avro, keyed by pair_id) with an idempotent producer.

    With a producer key (``key``, else PREFSTREAM_PRODUCER_KEY_ID and PREFSTREAM_PRODUCER_KEY) every
    pair is signed (streams/signing.py), so the workers honour its ``metadata.answer`` and
    ``metadata.tests`` when the key is theirs for the pair's source; without one those are ignored.
    Delivery errors are never dropped: the delivery callback records them and the next ``send``
    or ``flush`` raises DeliveryError.
    """

    def __init__(self, settings: Settings | None = None, topic: str | None = None,
                 key: HmacKey | None = None) -> None:
        self.settings = settings or get_settings()
        self.topic = topic or self.settings.topic(topics.RAW)
        self.codec = ValueCodec(self.settings.schema_registry_url)
        self.key = key or producer_signer()
        self._producer = Producer(producer_config(self.settings))
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self.sent = 0
        self.delivered = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        with self._lock:
            if err is not None:
                key = msg.key().decode(errors="replace") if msg.key() else "?"
                self._errors.append(f"pair {key}: {err.str()}")
            else:
                self.delivered += 1

    def _raise_pending(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise DeliveryError(f"{len(errors)} pair(s) were not written to {self.topic}: {errors[0]}{more}")

    def send(self, pair: Any) -> str:
        """Validate ``pair`` (dict or dataclass) and queue it; returns its pair_id.

        Raises InvalidRecordError (from schemas) for a bad pair, DeliveryError for an earlier failure.
        """
        self._raise_pending()
        record = validate_pair(pair)
        value, encoded = self.codec.encode("PreferencePair", record, self.topic)
        headers: list[tuple[str, str | bytes | None]] = [*encoded]
        if self.key is not None:
            # Signed as the workers decode it (every schema field, defaults filled), not as given.
            headers += sign_pair(self.codec.decode("PreferencePair", value, encoded, self.topic), self.key)
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=record["pair_id"].encode(),
                                       headers=headers, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve callbacks, then retry
            except KafkaException as exc:
                raise BrokerError(f"cannot produce to {self.topic}: {exc.args[0].str()}") from exc
        self._producer.poll(0)
        self.sent += 1
        return record["pair_id"]

    def flush(self, timeout: float = DEFAULT_FLUSH_TIMEOUT_S) -> None:
        """Wait until every queued pair is acknowledged; raise DeliveryError if any failed or timed out."""
        remaining = self._producer.flush(timeout)
        self._raise_pending()
        if remaining:
            raise DeliveryError(
                f"{remaining} pair(s) still unacknowledged after {timeout:.0f} s; is Kafka at "
                f"{self.settings.bootstrap} up? (`prefstream stack status`)"
            )

    def __enter__(self) -> PreferenceProducer:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.flush()


class ScoreConsumer(TopicReader):
    """Iterates ScoredPair records from ``prefs.scored``; commits each one after the loop body ran.

    Each (pair_id, model_version) is yielded once per consumer instance, so an application does not
    see a score twice when the worker aborted a transaction and redid the batch (the embedded broker
    delivers the aborted copy to read_committed consumers too; Apache Kafka does not). The consumer
    remembers the last ``max_seen`` identities (default 100,000, a bounded LRU set of about
    30 MB; ``max_seen`` sets it): a copy that arrives more than ``max_seen`` distinct identities
    after the first one is yielded again, and so is a second copy that a new instance reads after a
    restart when the previous instance had yielded the first (the memory is per instance). A pair
    scored again by another model version is a new score and is yielded. Skipped copies are
    committed like any other record and counted in ``self.duplicates``.
    """

    def __init__(self, settings: Settings | None = None, group: str = "prefstream-scores", topic: str | None = None,
                 max_seen: int = DEFAULT_DEDUPE_MAX) -> None:
        settings = settings or get_settings()
        super().__init__(topic or settings.topic(topics.SCORED), "ScoredPair", settings, group=group, dedupe=max_seen)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.records()
