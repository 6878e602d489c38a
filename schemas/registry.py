"""Loads the Avro schemas shipped in ``schemas/avsc`` and indexes them by name and fingerprint.

Schemas reference each other by full name (``prefstream.PreferencePair``), so they are parsed in
dependency order into one shared ``named_schemas`` table. Released versions of each schema live in
``avsc/released/``: they are what older producers wrote with, so the decoder must still know their
fingerprints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import expand_schema, fingerprint, to_parsing_canonical_form

from schemas.exceptions import UnknownSchemaError

AVSC_DIR = Path(__file__).parent / "avsc"
RELEASED_DIR = AVSC_DIR / "released"
NAMESPACE = "prefstream"

# Parse order: a schema comes after every schema it references.
SCHEMA_NAMES: tuple[str, ...] = (
    "PreferencePair",
    "ScoredPair",
    "ReviewTask",
    "Annotation",
    "VerifiedPair",
    "CuratedPair",
    "DeadLetter",
    "ModelVersion",
)


@dataclass(frozen=True)
class Schema:
    """One parsed schema with what the wire format needs to find it again."""

    name: str
    parsed: Any  # fastavro's parsed form, ready for schemaless_writer/reader
    fingerprint: str  # hex CRC-64-AVRO of the expanded canonical form
    expanded_json: str  # self-contained JSON (references inlined), e.g. for a schema registry
    version: str  # 'current' or the released file's version tag


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _make(name: str, raw: dict, named: dict, version: str) -> Schema:
    parsed = parse_schema(raw, named_schemas=named)
    expanded = expand_schema(parsed)
    fp = fingerprint(to_parsing_canonical_form(expanded), "CRC-64-AVRO")
    return Schema(name, parsed, fp, json.dumps(expanded), version)


@cache
def current() -> dict[str, Schema]:
    """The schemas this code writes with, by short name."""
    named: dict = {}
    return {name: _make(name, _read_json(AVSC_DIR / f"{name}.avsc"), named, "current") for name in SCHEMA_NAMES}


def released_files(name: str) -> list[Path]:
    """Older released versions of ``name`` (``released/<Name>.v<N>.avsc``), oldest first."""
    return sorted(RELEASED_DIR.glob(f"{name}.v*.avsc"), key=lambda p: int(p.stem.rsplit(".v", 1)[1]))


@cache
def by_fingerprint() -> dict[str, Schema]:
    """Every schema we can read: current ones and released ones, keyed by fingerprint."""
    table = {s.fingerprint: s for s in current().values()}
    for name in SCHEMA_NAMES:
        for path in released_files(name):
            # A released schema is parsed against the current versions of the types it references.
            named = {f"{NAMESPACE}.{k}": v.parsed for k, v in current().items() if k != name}
            version = path.stem.rsplit(".", 1)[1]
            schema = _make(name, _read_json(path), dict(named), version)
            table.setdefault(schema.fingerprint, schema)
    return table


def get(name: str) -> Schema:
    """The current schema called ``name`` (short name, e.g. 'PreferencePair')."""
    try:
        return current()[name]
    except KeyError:
        raise UnknownSchemaError(
            f"no schema named {name!r}; known schemas: {', '.join(SCHEMA_NAMES)}"
        ) from None


def lookup(fp: str) -> Schema:
    """The schema (current or released) whose fingerprint is ``fp``."""
    try:
        return by_fingerprint()[fp]
    except KeyError:
        raise UnknownSchemaError(
            f"no known schema has fingerprint {fp!r}; the producer may use a newer prefstream than this reader"
        ) from None
