"""Every librdkafka setting prefstream uses, in one place.

Tansu (the embedded broker) joins new consumer groups slowly with librdkafka's defaults (~23 s);
short session and poll timeouts bring that to ~3 s (docs/design.md, The embedded broker). They are also sane on Apache Kafka
for processors that poll often.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from streams.kafka.topics import MAX_MESSAGE_BYTES
from streams.settings import Settings

# librdkafka's own log lines go through Python logging (served on poll), not straight to stderr:
# services that configure logging see them in their logs, and a client idling in a test or a CLI
# prints nothing when a broker it does not need goes away.
KAFKA_LOG = logging.getLogger("prefstream.kafka")
KAFKA_LOG.addHandler(logging.NullHandler())
# While a broker is away librdkafka logs every reconnect attempt of every client (several lines a
# second per process); one line per kind of message and window says the same.
REPEAT_WINDOW_S = 30.0


class _RepeatFilter(logging.Filter):
    """Lets a message through once per window; the next one that passes says how many were held back.
    Messages count as the same when they differ only in numbers (ports, milliseconds)."""

    MAX_KINDS = 1000

    def __init__(self, window_s: float) -> None:
        super().__init__()
        self.window_s = window_s
        self.seen: dict[str, list[float]] = {}  # kind -> [when it last passed, how many held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        entry = self.seen.get(kind)
        if entry is not None and now - entry[0] < self.window_s:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg, record.args = f"{record.getMessage()} ({int(entry[1])} like it held back)", None
        if len(self.seen) >= self.MAX_KINDS:
            self.seen.clear()
        self.seen[kind] = [now, 0]
        return True


KAFKA_LOG.addFilter(_RepeatFilter(REPEAT_WINDOW_S))

SESSION_TIMEOUT_MS = 6000
MAX_POLL_INTERVAL_MS = 10000
HEARTBEAT_INTERVAL_MS = 1500
# How long the broker may hold a fetch that found no data. librdkafka's default is 500 ms; Tansu
# does not answer a waiting fetch as soon as data arrives, so each hop (raw -> worker, scored ->
# reader) cost p50 125 ms / p99 245 ms at 500 and 25 ms / 52 ms at 100 (measured at 7 records/s).
# Apache Kafka answers at once, so there a shorter wait only adds empty fetches.
FETCH_WAIT_MAX_MS = 100
# For consumers where a second of delay costs nothing (the shard writer, the model-version watcher).
# Every empty fetch costs the broker CPU, and the embedded broker shares the worker's cores: an idle
# worker's three consumers at 100 ms took Tansu 1.35 CPU-s per 20 s, at 1,000 ms 0.27.
BACKGROUND_FETCH_WAIT_MS = 1000
# MAX_MESSAGE_BYTES (8 MiB) lives in topics.py with the topics' own max.message.bytes, so a producer
# never sends more than a topic takes. Large pairs are limited to 4 MiB of text by the codec.
__all__ = ["MAX_MESSAGE_BYTES", "admin_config", "consumer_config", "producer_config"]


def _common(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap,
        "security.protocol": settings.security_protocol,
        # A broker closing idle connections is routine; do not print it as an error.
        "log.connection.close": False,
        "logger": KAFKA_LOG,
    }
    if settings.ssl_ca_location:
        conf["ssl.ca.location"] = str(settings.ssl_ca_location)
    if settings.sasl_mechanism:
        conf["sasl.mechanism"] = settings.sasl_mechanism
        conf["sasl.username"] = settings.sasl_username or ""
        conf["sasl.password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
    return conf


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    conf = _common(settings) | {
        # Idempotence: retries never duplicate or reorder within a partition.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.max.bytes": MAX_MESSAGE_BYTES,
        "compression.type": "lz4",
    }
    return conf | overrides


def consumer_config(settings: Settings, group: str | None, background: bool = False) -> dict[str, Any]:
    """``background``: a consumer where a second of delay costs nothing fetches with the longer broker wait.
    A caller that needs another librdkafka setting merges it into the dict this returns."""
    conf = _common(settings) | {
        "auto.offset.reset": "earliest",
        # Offsets are committed by the code after a record is processed, never by a timer.
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "max.poll.interval.ms": MAX_POLL_INTERVAL_MS,
        "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
        "fetch.max.bytes": MAX_MESSAGE_BYTES * 2,
        "max.partition.fetch.bytes": MAX_MESSAGE_BYTES,
        "isolation.level": "read_committed",
        "fetch.wait.max.ms": BACKGROUND_FETCH_WAIT_MS if background else FETCH_WAIT_MAX_MS,
    }
    # librdkafka requires a group.id even for assign()-only readers; such a reader never commits.
    conf["group.id"] = group or "prefstream-reader"
    return conf


def admin_config(settings: Settings) -> dict[str, Any]:
    return _common(settings)
