"""The typed records in schemas.records match the Avro schemas field for field."""

from __future__ import annotations

import json
import typing

import pytest

from schemas import records, registry


def _record_types(schema: object) -> typing.Iterator[dict]:
    """Every record type defined inside a parsed schema (the top record and nested ones)."""
    if isinstance(schema, dict):
        if schema.get("type") == "record":
            yield schema
        for value in schema.values():
            yield from _record_types(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _record_types(item)


@pytest.mark.parametrize("name", sorted(records.BY_SCHEMA))
def test_typed_record_keys_are_the_schema_fields(name):
    schema = json.loads(registry.get(name).expanded_json)
    for record in _record_types(schema):
        typed = getattr(records, record["name"].rsplit(".", 1)[-1])
        assert set(typing.get_type_hints(typed)) == {f["name"] for f in record["fields"]}, record["name"]


def test_every_schema_has_a_typed_record():
    assert set(records.BY_SCHEMA) == {path.stem for path in registry.AVSC_DIR.glob("*.avsc")}
