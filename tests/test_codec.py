"""Codec: JSON -> PreferencePair validation, Avro round trips, wire framing (unit level, no broker)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec, registry
from schemas.exceptions import DecodeError, InvalidRecordError
from schemas.pairs import (
    MAX_CREATED_AT_MS,
    MAX_TEXT_BYTES,
    content_id,
    pair_from_json,
    pair_to_json,
    validate_pair,
)
from schemas.wire import SCHEMA_HEADER, ValueCodec

text = st.text(min_size=0, max_size=200)
nonblank = st.text(min_size=1, max_size=200).filter(lambda s: s.strip())
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": text})


@st.composite
def valid_pairs(draw):
    chosen = draw(nonblank)
    rejected = draw(nonblank.filter(lambda s: s != chosen))
    pair = {"conversation": draw(st.lists(turn, min_size=1, max_size=5)), "chosen": chosen, "rejected": rejected}
    optional = {
        "source": text, "label_source": st.sampled_from(["human", "llm", "implicit", "tool"]),
        "created_at": st.integers(min_value=0, max_value=MAX_CREATED_AT_MS),
        "metadata": st.dictionaries(text, text, max_size=3),
        "task_category": nonblank, "objectivity": st.sampled_from(["factual", "opinion", "open-ended"]),
        "controversiality": st.sampled_from(["low", "medium", "high"]),
        "expected_attributes": st.lists(nonblank, max_size=3), "annotation_guideline": nonblank,
    }
    for key, strat in optional.items():
        if draw(st.booleans()):
            pair[key] = draw(strat)
    return pair


@settings(max_examples=200, deadline=None)
@given(valid_pairs())
def test_any_valid_pair_survives_json_avro_json(pair):
    record = pair_from_json(json.dumps(pair))
    back = codec.decode("PreferencePair", codec.encode("PreferencePair", record))
    assert back == record
    assert pair_from_json(pair_to_json(back)) == record
    for key in ("conversation", "chosen", "rejected"):
        assert back[key] == pair[key]


def test_avro_encode_refuses_a_record_off_its_schema_and_names_the_field():
    record = pair_from_json(json.dumps(BASE))
    for bad in (record | {"task_category": 7}, record | {"created_at": "yesterday"}):
        with pytest.raises(InvalidRecordError) as info:
            codec.encode("PreferencePair", bad)
        assert info.value.reason == "wrong_type"
        assert "does not match the PreferencePair schema" in str(info.value)
        assert next(k for k in bad if bad[k] != record.get(k)) in str(info.value)  # the offending field is named


@settings(max_examples=100, deadline=None)
@given(valid_pairs())
def test_pair_id_is_stable_content_hash(pair):
    a = validate_pair(pair)
    b = validate_pair(dict(pair))
    assert a["pair_id"] == b["pair_id"] == content_id(a["conversation"], a["chosen"], a["rejected"])


BASE = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def assert_invalid(payload, field: str, reason: str) -> None:
    """The one check for every invalid-input case: our error type, naming the field and the reason."""
    with pytest.raises(InvalidRecordError) as info:
        pair_from_json(payload) if isinstance(payload, (bytes, str)) else validate_pair(payload)
    assert info.value.field == field, str(info.value)
    assert info.value.reason == reason, str(info.value)
    if field:
        assert field in str(info.value)


@pytest.mark.parametrize(
    ("payload", "field", "reason"),
    [
        ({"prompt": "q", "rejected": "b"}, "chosen", "missing_field"),
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing_field"),
        ({"chosen": "a", "rejected": "b"}, "conversation", "missing_field"),
        (BASE | {"chosen": 4}, "chosen", "wrong_type"),
        (BASE | {"rejected": ["x"]}, "rejected", "wrong_type"),
        (BASE | {"chosen": ""}, "chosen", "empty_field"),
        (BASE | {"chosen": "   "}, "chosen", "empty_field"),
        (BASE | {"rejected": "4"}, "rejected", "identical_responses"),
        (BASE | {"label_source": "robot"}, "label_source", "invalid_value"),
        (BASE | {"objectivity": "maybe"}, "objectivity", "invalid_value"),
        (BASE | {"created_at": "yesterday"}, "created_at", "invalid_value"),
        (BASE | {"metadata": {"a": 1}}, "metadata.a", "wrong_type"),
        (BASE | {"bogus": 1}, "bogus", "unknown_field"),
        ({"conversation": "hi", "chosen": "a", "rejected": "b"}, "conversation", "wrong_type"),
        ({"conversation": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "conversation[0].content", "missing_field"),
        ({"conversation": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "conversation[0].role", "invalid_value"),
        ([1, 2], "", "wrong_type"),
    ],
)
def test_invalid_pairs_name_the_field(payload, field, reason):
    assert_invalid(payload, field, reason)


def test_five_megabyte_string_is_too_large():
    assert_invalid(BASE | {"chosen": "x" * (5 * 1024 * 1024)}, "chosen", "too_large")
    assert_invalid(BASE | {"chosen": "x" * (MAX_TEXT_BYTES + 1)}, "chosen", "too_large")
    assert validate_pair(BASE | {"chosen": "x" * MAX_TEXT_BYTES})["chosen"]


def test_invalid_utf8_names_the_field():
    raw = b'{"prompt": "q", "chosen": "ok", "rejected": "bad \xff\xfe bytes"}'
    assert_invalid(raw, "rejected", "invalid_utf8")
    assert_invalid('{"prompt": "q", "chosen": "\\ud800", "rejected": "b"}', "chosen", "invalid_utf8")


def test_broken_json_is_invalid_json():
    assert_invalid(b'{"prompt": "q", "chosen": ', "", "invalid_json")
    assert_invalid(b"[" * 100000, "", "invalid_json")


def test_dataclass_input_is_accepted():
    from dataclasses import dataclass

    @dataclass
    class Pair:
        prompt: str
        chosen: str
        rejected: str

    assert validate_pair(Pair("q", "a", "b"))["conversation"] == [{"role": "user", "content": "q"}]


def test_wire_header_carries_fingerprint_and_wrong_schema_is_refused():
    vc = ValueCodec()
    record = validate_pair(BASE)
    value, headers = vc.encode("PreferencePair", record, "t")
    assert dict(headers)[SCHEMA_HEADER].decode() == registry.get("PreferencePair").fingerprint
    assert vc.decode("PreferencePair", value, headers) == record
    with pytest.raises(DecodeError) as info:
        vc.decode("ScoredPair", value, headers)
    assert info.value.reason == "wrong_schema"
    with pytest.raises(DecodeError) as info:
        vc.decode("PreferencePair", value, [(SCHEMA_HEADER, b"0000000000000000")])
    assert info.value.reason == "unknown_schema"
    with pytest.raises(DecodeError) as info:
        vc.decode("PreferencePair", value[:-3], headers)
    assert info.value.reason == "invalid_avro"


def test_json_is_accepted_on_the_raw_topic_but_not_headerless_binary():
    vc = ValueCodec()
    assert vc.decode("PreferencePair", json.dumps(BASE).encode())["chosen"] == "4"
    with pytest.raises(DecodeError):
        vc.decode("PreferencePair", b"\x02\x04binary")


def test_schema_registry_wire_format_round_trip():
    vc = ValueCodec("mock://prefstream-test")
    record = validate_pair(BASE)
    value, headers = vc.encode("PreferencePair", record, "prefs.raw")
    assert value[0] == 0 and headers == []  # Confluent framing: magic byte, then the schema id
    assert vc.decode("PreferencePair", value, headers, "prefs.raw") == record
