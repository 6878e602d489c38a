"""Errors of the schemas package. Everything raised here derives from SchemaError."""

from __future__ import annotations


class SchemaError(Exception):
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
