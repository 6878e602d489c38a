"""Errors of the schemas package, and the base of every prefstream error.

``PrefstreamError`` lives here because schemas is the bottom layer: the root errors of
``trainers`` (TrainerError) and ``streams`` (StreamsError) derive from it, so the CLI catches one
class and prints its message, which says the fix.
"""

from __future__ import annotations


class PrefstreamError(Exception):
    """Base of every error prefstream raises on purpose; the message says what to do about it."""


class SchemaError(PrefstreamError):
    """Root of every error the schemas package raises."""


class UnknownSchemaError(SchemaError):
    """A schema name or fingerprint that this version of prefstream does not know."""


class InvalidRecordError(SchemaError):
    """A record that does not fit its schema. ``field`` names the offending field ('' for the whole record)."""

    def __init__(self, field: str, message: str, reason: str = "invalid") -> None:
        self.field = field
        self.reason = reason
        where = f"field '{field}': " if field else ""
        super().__init__(f"{where}{message}")


class DecodeError(SchemaError):
    """Bytes that cannot be decoded with the schema they claim (or any schema we know)."""

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        self.reason = reason
        super().__init__(message)


class CompatibilityError(SchemaError):
    """A schema change that would make data written with an older version unreadable."""
