"""Backward-compatibility check: can the current schema read data written with an older one?

The check is behavioural, not a diff of JSON: it writes a sample record (every field filled,
every union branch that is not null taken) with the old schema and reads it with the new one.
fastavro's schema resolution then fails exactly where a real consumer would, for example on a new
field without a default or a changed type.
"""

from __future__ import annotations

import io
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import expand_schema

from schemas.exceptions import CompatibilityError

_PRIMITIVE_SAMPLES: dict[str, Any] = {
    "string": "s", "bytes": b"b", "int": 1, "long": 2, "float": 1.5, "double": 2.5, "boolean": True, "null": None,
}


def sample(schema: Any, named: dict[str, Any] | None = None) -> Any:
    """A record that exercises every field of a parsed (or raw) schema."""
    named = {} if named is None else named
    if isinstance(schema, str):
        if schema in _PRIMITIVE_SAMPLES:
            return _PRIMITIVE_SAMPLES[schema]
        return sample(named[schema], named)
    if isinstance(schema, list):  # union: prefer a non-null branch so nested fields are checked too
        branches = [b for b in schema if b != "null"] or schema
        return sample(branches[0], named)
    kind = schema["type"]
    if kind == "record":
        if "name" in schema:
            named[schema["name"]] = schema
        return {f["name"]: sample(f["type"], named) for f in schema["fields"]}
    if kind == "array":
        return [sample(schema["items"], named)]
    if kind == "map":
        return {"k": sample(schema["values"], named)}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "fixed":
        return b"\0" * schema["size"]
    return sample(kind, named)


def check_backward(old: dict, new: dict, named_schemas: dict | None = None) -> None:
    """Raise CompatibilityError if data written with ``old`` cannot be read with ``new``."""
    writer = parse_schema(old, named_schemas=dict(named_schemas or {}))
    reader = parse_schema(new, named_schemas=dict(named_schemas or {}))
    record = sample(expand_schema(writer))
    buf = io.BytesIO()
    schemaless_writer(buf, writer, record)
    buf.seek(0)
    try:
        schemaless_reader(buf, writer, reader)
    except Exception as exc:
        raise CompatibilityError(
            f"{new.get('name', '?')}: data written with the older schema cannot be read with the new one ({exc}); "
            "give new fields a default and never change a field's type"
        ) from None
