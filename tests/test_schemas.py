"""Schemas: every field documented, and every current schema reads data written with released versions."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

from schemas import registry
from schemas.compat import check_backward
from schemas.exceptions import CompatibilityError
from tests.helpers import ROOT


def _fields(schema):
    if isinstance(schema, dict):
        if schema.get("type") == "record":
            yield schema
            for f in schema["fields"]:
                yield from _fields(f["type"])
        elif schema.get("type") in ("array", "map"):
            yield from _fields(schema.get("items") or schema.get("values"))
    elif isinstance(schema, list):
        for b in schema:
            yield from _fields(b)


@pytest.mark.parametrize("name", registry.SCHEMA_NAMES)
def test_every_record_and_field_has_a_doc(name):
    raw = json.loads((registry.AVSC_DIR / f"{name}.avsc").read_text())
    for record in _fields(raw):
        assert record.get("doc"), f"{record['name']} has no doc"
        for field in record["fields"]:
            assert field.get("doc"), f"{record['name']}.{field['name']} has no doc"


def _named_except(name):
    return {f"{registry.NAMESPACE}.{k}": v.parsed for k, v in registry.current().items() if k != name}


@pytest.mark.parametrize("name", registry.SCHEMA_NAMES)
def test_current_schema_reads_every_released_version(name):
    released = registry.released_files(name)
    assert released, f"{name} has no released version in schemas/avsc/released"
    new = json.loads((registry.AVSC_DIR / f"{name}.avsc").read_text())
    for path in released:
        check_backward(json.loads(path.read_text()), new, _named_except(name))


@pytest.mark.parametrize("name", registry.SCHEMA_NAMES)
def test_current_schema_reads_previous_committed_version(name):
    rel = f"schemas/avsc/{name}.avsc"
    try:
        old = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip(f"no committed version of {rel} to compare with (not a git checkout, or a new schema)")
    new = json.loads((ROOT / rel).read_text())
    check_backward(json.loads(old), new, _named_except(name))


def test_checker_catches_a_new_field_without_default():
    old = json.loads((registry.AVSC_DIR / "ModelVersion.avsc").read_text())
    new = copy.deepcopy(old)
    new["fields"].append({"name": "owner", "type": "string", "doc": "added without a default"})
    with pytest.raises(CompatibilityError, match="default"):
        check_backward(old, new)
    new["fields"][-1]["default"] = ""
    check_backward(old, new)


def test_checker_catches_a_changed_type():
    old = json.loads((registry.AVSC_DIR / "DeadLetter.avsc").read_text())
    new = copy.deepcopy(old)
    next(f for f in new["fields"] if f["name"] == "source_offset")["type"] = "string"
    with pytest.raises(CompatibilityError):
        check_backward(old, new)


def test_old_writer_fingerprints_resolve():
    for path in registry.RELEASED_DIR.glob("*.avsc"):
        name = path.stem.split(".")[0]
        fps = [s.fingerprint for s in registry.by_fingerprint().values() if s.name == name]
        assert fps, f"no fingerprint known for {name}"


def test_a_dead_letter_written_before_the_hardening_fields_reads_with_their_defaults():
    import io

    from fastavro import parse_schema, schemaless_writer

    from schemas import codec

    v1 = json.loads((registry.RELEASED_DIR / "DeadLetter.v1.avsc").read_text())
    old = {"original_key": None, "original_value": b"{", "original_headers": {}, "reason": "invalid_json",
           "detail": "field '': not valid JSON", "source_topic": "prefs.raw", "source_partition": 0,
           "source_offset": 7, "processor": "ingest", "failed_at": 1}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(v1), old)
    writer = next(s for s in registry.by_fingerprint().values() if s.name == "DeadLetter" and s.version != "current")
    new = codec.decode("DeadLetter", buf.getvalue(), writer)
    assert new["error_type"] == "" and new["original_size"] is None and new["original_sha256"] is None
    assert new["original_truncated"] is False and new["source_offset"] == 7
