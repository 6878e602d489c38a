"""Avro schemas of every prefstream event and the codec that reads and writes them.

This package imports neither ``streams`` nor ``trainers``.
"""

from schemas.exceptions import (
    CompatibilityError,
    DecodeError,
    InvalidRecordError,
    SchemaError,
    UnknownSchemaError,
)
from schemas.pairs import pair_from_json, pair_to_json, validate_pair
from schemas.wire import ValueCodec

__all__ = [
    "CompatibilityError", "DecodeError", "InvalidRecordError", "SchemaError", "UnknownSchemaError",
    "ValueCodec", "pair_from_json", "pair_to_json", "validate_pair",
]
