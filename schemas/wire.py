"""Record values on Kafka topics: how they are framed and how a reader finds the writer's schema.

- With a schema registry URL: the Confluent wire format (magic byte 0, 4-byte schema id, Avro),
  through confluent-kafka's AvroSerializer/AvroDeserializer, so Java and Go consumers read it.
- Without one: schemaless Avro, and the writer schema's CRC-64-AVRO fingerprint in the
  ``prefstream-schema`` header; the reader resolves old writer versions from ``avsc/released``.
- JSON PreferencePairs (any client, e.g. kcat) are accepted on the way in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from schemas import codec, registry
from schemas.exceptions import DecodeError, SchemaError
from schemas.pairs import pair_from_json

SCHEMA_HEADER = "prefstream-schema"
CONFLUENT_MAGIC = 0

Headers = list[tuple[str, bytes]]


def header(headers: Sequence[tuple[str, bytes | None]] | Mapping[str, bytes] | None, key: str) -> bytes | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, Mapping) else headers
    for k, v in items:
        if k == key:
            return v
    return None


class ValueCodec:
    """Encodes and decodes topic values; one instance per process (it caches registry clients)."""

    def __init__(self, schema_registry_url: str | None = None) -> None:
        self.registry_url = schema_registry_url
        self._serializers: dict[str, Any] = {}
        self._deserializers: dict[str, Any] = {}
        self._client = None
        if schema_registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            # new_client gives the in-memory mock for mock:// URLs (used by tests), the REST client otherwise.
            self._client = SchemaRegistryClient.new_client({"url": schema_registry_url})

    def _ctx(self, topic: str):
        from confluent_kafka.serialization import MessageField, SerializationContext

        return SerializationContext(topic, MessageField.VALUE)

    def encode(self, name: str, record: Mapping[str, Any], topic: str) -> tuple[bytes, Headers]:
        """Bytes and headers for ``record`` of schema ``name`` to be written to ``topic``."""
        schema = registry.get(name)
        if self._client is None:
            return codec.encode(name, record), [(SCHEMA_HEADER, schema.fingerprint.encode())]
        from confluent_kafka.schema_registry.avro import AvroSerializer

        codec.encode(name, record)  # validate with our own error type first
        ser = self._serializers.get(name)
        if ser is None:
            ser = self._serializers[name] = AvroSerializer(self._client, schema.expanded_json)
        try:
            return ser(dict(record), self._ctx(topic)), []
        except Exception as exc:
            raise SchemaError(f"schema registry at {self.registry_url} refused a {name}: {exc}") from exc

    def decode(self, name: str, value: bytes | None, headers: Any = None, topic: str = "") -> dict[str, Any]:
        """The record of schema ``name`` in ``value``; JSON is accepted for PreferencePair."""
        if value is None:
            raise DecodeError("the record has no value (a tombstone)", "empty_value")
        fp = header(headers, SCHEMA_HEADER)
        if fp is not None:
            try:
                writer = registry.lookup(fp.decode("ascii", errors="replace"))
            except SchemaError as exc:
                raise DecodeError(str(exc), "unknown_schema") from None
            return codec.decode(name, value, writer)
        if self._client is not None and value[:1] == bytes([CONFLUENT_MAGIC]) and len(value) > 5:
            return self._decode_registry(name, value, topic)
        if name == "PreferencePair" and value.lstrip()[:1] == b"{":
            return pair_from_json(value)
        if value[:1] == bytes([CONFLUENT_MAGIC]) and self._client is None:
            raise DecodeError("the value is in the Confluent wire format but SCHEMA_REGISTRY_URL is not set", "unknown_schema")
        raise DecodeError(
            f"the value has no {SCHEMA_HEADER} header and is not JSON; publish JSON or use prefstream's producer",
            "unknown_schema",
        )

    def _decode_registry(self, name: str, value: bytes, topic: str) -> dict[str, Any]:
        from confluent_kafka.schema_registry.avro import AvroDeserializer

        de = self._deserializers.get(name)
        if de is None:
            de = self._deserializers[name] = AvroDeserializer(self._client, registry.get(name).expanded_json)
        try:
            return de(value, self._ctx(topic))
        except Exception as exc:
            raise DecodeError(f"could not decode a registry-framed {name}: {exc}", "invalid_avro") from None
