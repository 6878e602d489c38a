"""Errors of the streams package. Everything raised here derives from StreamsError.

Errors from confluent-kafka, redis and subprocesses are translated at the boundary
(``raise ... from exc``) into these, and every message says what to do about it.
"""

from __future__ import annotations

from schemas.exceptions import PrefstreamError


class StreamsError(PrefstreamError):
    """Root of every error the streams package raises."""


class ConfigError(StreamsError):
    """A setting or argument with a value that cannot work."""


class StackError(StreamsError):
    """The embedded broker or Redis could not be started, reached or stopped."""


class PortInUseError(StackError):
    """The port a server should listen on is taken by another process."""


class BinaryNotFoundError(StackError):
    """A server binary (tansu, redis-server, weed) is not installed."""


class ObjectStoreError(StackError):
    """The embedded object store (SeaweedFS) refused a request, or its credentials file is unusable."""


class BrokerError(StreamsError):
    """A Kafka operation failed (delivery, admin, consume). Named so as not to shadow confluent_kafka.KafkaError."""


class DeliveryError(BrokerError):
    """A produced record was not acknowledged by the broker; it was not written."""


class JobError(StreamsError):
    """A retrain job could not be started or its outcome could not be read."""


class ProcessingError(StreamsError):
    """A record a processor could not handle; it goes to prefs.dlq with ``reason`` and ``stage``."""

    def __init__(self, message: str, reason: str = "processing_error", stage: str = "") -> None:
        self.reason, self.stage = reason, stage
        super().__init__(message)


class OutputTooLargeError(ProcessingError):
    """An output record larger than its topic's max.message.bytes: the broker would refuse the whole batch."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "too_large", "encode")


class StageFailedError(StreamsError):
    """A batch stage failed for every record of a batch: the fault is the stage's (a broken model), not the data's."""


class ModelRefusedError(StreamsError):
    """An announced model version that the worker will not load (failed verification or outside the store)."""


class UntrustedModelPathError(ModelRefusedError):
    """A models.versions announcement naming a path outside the worker's models store, or a malformed version."""


class SignatureError(StreamsError):
    """A record whose signature does not prove that the one party allowed to write it did (streams/signing.py)."""

    def __init__(self, message: str, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class JudgeError(StreamsError):
    """The optional LLM judge of the review app did not answer, or answered outside its schema."""
