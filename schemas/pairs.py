"""Application JSON <-> PreferencePair: validation, conversion and the stable pair id.

This is the one place that decides whether a pair is acceptable. Every rejection raises
InvalidRecordError naming the field and a typed ``reason`` (the DLQ's reason code), never a
KeyError or a UnicodeError from deep inside a library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
import unicodedata
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from schemas.exceptions import InvalidRecordError

LABEL_SOURCES = ("human", "llm", "implicit", "tool")
OBJECTIVITY = ("factual", "opinion", "open-ended")
CONTROVERSIALITY = ("low", "medium", "high")
ROLES = ("system", "user", "assistant")

# Limits on one text field and on the whole pair. A reward model truncates to a few thousand
# tokens anyway; anything larger is almost always a bug upstream and would bloat every topic.
MAX_TEXT_BYTES = 1 << 20
MAX_PAIR_BYTES = 4 << 20
MAX_TURNS = 256
# created_at bounds: an Avro long holds it, and a date past year 9999 is a bug upstream (datetime
# cannot even show it), so both ends are rejected with the field named rather than overflowing later.
MAX_CREATED_AT_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
# pair_id: it is a Kafka key, a Redis key and a file name in shards; a short, plain charset keeps
# every one of those safe. The aggregator and the review app derive task ids by appending these
# suffixes to a pair_id, so a producer id ending in one could collide with a derived id.
MAX_PAIR_ID_CHARS = 128
PAIR_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
RESERVED_ID_SUFFIXES = (":expert", ":re")

_OPTIONAL_STR = ("task_category", "annotation_guideline")
_ALLOWED_KEYS = {
    "pair_id", "conversation", "prompt", "chosen", "rejected", "source", "label_source",
    "created_at", "metadata", "task_category", "objectivity", "controversiality",
    "expected_attributes", "annotation_guideline",
}


def now_ms() -> int:
    return int(time.time() * 1000)


def _text(field: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidRecordError(field, f"must be a string, got {type(value).__name__}", "wrong_type")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates: invalid UTF-8 bytes decoded with surrogateescape, or a JSON "\ud800".
        raise InvalidRecordError(field, "is not valid UTF-8 text", "invalid_utf8") from None
    if size > MAX_TEXT_BYTES:
        raise InvalidRecordError(
            field, f"is {size:,} bytes; the limit is {MAX_TEXT_BYTES:,} bytes per text field", "too_large"
        )
    if not allow_empty and not value.strip():
        raise InvalidRecordError(field, "must not be empty", "empty_field")
    return value


def _conversation(obj: Mapping[str, Any]) -> list[dict[str, str]]:
    if "conversation" in obj and obj["conversation"] is not None:
        turns = obj["conversation"]
        if not isinstance(turns, list):
            raise InvalidRecordError("conversation", f"must be a list of {{role, content}} turns, got {type(turns).__name__}", "wrong_type")
        if not turns:
            raise InvalidRecordError("conversation", "must hold at least one turn", "empty_field")
        if len(turns) > MAX_TURNS:
            raise InvalidRecordError("conversation", f"has {len(turns)} turns; the limit is {MAX_TURNS}", "too_large")
        out = []
        for i, turn in enumerate(turns):
            where = f"conversation[{i}]"
            if not isinstance(turn, Mapping):
                raise InvalidRecordError(where, f"must be an object with role and content, got {type(turn).__name__}", "wrong_type")
            if "role" not in turn or "content" not in turn:
                missing = "role" if "role" not in turn else "content"
                raise InvalidRecordError(f"{where}.{missing}", "is missing", "missing_field")
            role = _text(f"{where}.role", turn["role"])
            if role not in ROLES:
                raise InvalidRecordError(f"{where}.role", f"is {role!r}; use one of {', '.join(ROLES)}", "invalid_value")
            out.append({"role": role, "content": _text(f"{where}.content", turn["content"], allow_empty=True)})
        return out
    if "prompt" in obj and obj["prompt"] is not None:
        return [{"role": "user", "content": _text("prompt", obj["prompt"])}]
    raise InvalidRecordError("conversation", "is missing (give 'conversation' as a list of turns, or 'prompt' as a string)", "missing_field")


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    text = _text(field, value)
    if text not in allowed:
        raise InvalidRecordError(field, f"is {text!r}; use one of {', '.join(allowed)}", "invalid_value")
    return text


def _shown(value: Any, limit: int = 60) -> str:
    """A value for an error message, truncated so a hostile record cannot flood a log or the DLQ."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} chars)"


def _created_at(value: Any) -> int:
    if value is None:
        return now_ms()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRecordError("created_at", f"must be epoch milliseconds or an ISO-8601 string, got {type(value).__name__}", "wrong_type")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000
        except (ValueError, OverflowError, OSError):
            raise InvalidRecordError("created_at", f"{_shown(value)} is not an ISO-8601 timestamp; "
                                     "write e.g. 2026-01-31T12:00:00Z", "invalid_value") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRecordError("created_at", f"is {value}; give epoch milliseconds as a finite number", "invalid_value")
    if not 0 <= value <= MAX_CREATED_AT_MS:
        raise InvalidRecordError("created_at", f"is {_shown(value)}; give epoch milliseconds between 0 and "
                                 f"{MAX_CREATED_AT_MS} (year 9999)", "invalid_value")
    return int(value)


def _pair_id(value: Any) -> str:
    text = _text("pair_id", value)
    if not PAIR_ID_PATTERN.fullmatch(text):
        raise InvalidRecordError("pair_id", f"is {_shown(text)}; use 1 to {MAX_PAIR_ID_CHARS} characters of "
                                 "A-Z a-z 0-9 . _ : - (or leave it out for a content hash)", "invalid_pair_id")
    if text.endswith(RESERVED_ID_SUFFIXES):
        raise InvalidRecordError("pair_id", f"is {_shown(text)}; ids ending in {' or '.join(RESERVED_ID_SUFFIXES)} are "
                                 "reserved for the ids prefstream derives (review tasks); choose another id",
                                 "invalid_pair_id")
    return text


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRecordError("metadata", f"must be an object of strings, got {type(value).__name__}", "wrong_type")
    return {_text("metadata key", k, allow_empty=True): _text(f"metadata.{k}", v, allow_empty=True) for k, v in value.items()}


def content_id(conversation: list[dict[str, str]], chosen: str, rejected: str) -> str:
    """Stable pair id: sha256 over the content, so the same pair always gets the same id."""
    canonical = json.dumps([conversation, chosen, rejected], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def validate_pair(obj: Any) -> dict[str, Any]:
    """Check an application pair (a dict, or a dataclass) and return a PreferencePair record.

    Raises InvalidRecordError naming the first bad field. Content is kept exactly as given
    (normalisation is the ingest processor's decision, not the producer's).
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, Mapping):
        raise InvalidRecordError("", f"a pair must be a JSON object, got {type(obj).__name__}", "wrong_type")
    unknown = sorted(set(obj) - _ALLOWED_KEYS)
    if unknown:
        raise InvalidRecordError(unknown[0], f"is not a PreferencePair field (known: {', '.join(sorted(_ALLOWED_KEYS))})", "unknown_field")
    for field in ("chosen", "rejected"):
        if obj.get(field) is None:
            raise InvalidRecordError(field, "is missing", "missing_field")
    conversation = _conversation(obj)
    chosen = _text("chosen", obj["chosen"])
    rejected = _text("rejected", obj["rejected"])
    if chosen == rejected:
        raise InvalidRecordError("rejected", "is identical to chosen, so the pair carries no preference", "identical_responses")
    pair_id = obj.get("pair_id")
    pair_id = content_id(conversation, chosen, rejected) if pair_id in (None, "") else _pair_id(pair_id)
    expected = obj.get("expected_attributes")
    if expected is not None:
        if not isinstance(expected, list):
            raise InvalidRecordError("expected_attributes", f"must be a list of strings, got {type(expected).__name__}", "wrong_type")
        expected = [_text(f"expected_attributes[{i}]", v) for i, v in enumerate(expected)]
    record: dict[str, Any] = {
        "pair_id": pair_id,
        "conversation": conversation,
        "chosen": chosen,
        "rejected": rejected,
        "source": _text("source", obj.get("source") or "", allow_empty=True),
        "label_source": _choice("label_source", obj.get("label_source") or "implicit", LABEL_SOURCES),
        "created_at": _created_at(obj.get("created_at")),
        "metadata": _metadata(obj.get("metadata")),
        "objectivity": None if obj.get("objectivity") is None else _choice("objectivity", obj["objectivity"], OBJECTIVITY),
        "controversiality": None if obj.get("controversiality") is None else _choice("controversiality", obj["controversiality"], CONTROVERSIALITY),
        "expected_attributes": expected,
    }
    for field in _OPTIONAL_STR:
        record[field] = None if obj.get(field) is None else _text(field, obj[field])
    total = _text_bytes(record)
    if total > MAX_PAIR_BYTES:
        raise InvalidRecordError("", f"the pair holds {total:,} bytes of text (conversation, responses, metadata keys "
                                 f"and values, other fields); the limit is {MAX_PAIR_BYTES:,}: move bulky data out "
                                 "of the pair", "too_large")
    return record


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in a validated record, dict keys included (metadata's are data too)."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, Mapping):
        return sum(_text_bytes(k) + _text_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0


def pair_from_json(data: bytes | str) -> dict[str, Any]:
    """Parse and validate one JSON-encoded pair. Invalid UTF-8 is reported with the field it is in."""
    if isinstance(data, bytes):
        # surrogateescape keeps bad bytes as lone surrogates so _text can name the field holding them.
        data = data.decode("utf-8", errors="surrogateescape")
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InvalidRecordError("", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", "invalid_json") from None
    except RecursionError:
        raise InvalidRecordError("", "JSON nested too deeply; a pair needs a few levels at most", "invalid_json") from None
    except ValueError as exc:
        # Python refuses integers of more than 4,300 digits (int_max_str_digits): no field needs one.
        raise InvalidRecordError("", f"not a usable JSON number: {str(exc)[:120]}; numbers must fit in 64 bits",
                                 "invalid_number") from None
    return validate_pair(obj)


def pair_to_json(record: Mapping[str, Any]) -> str:
    """One line of JSON for a PreferencePair record (the same shape pair_from_json accepts)."""
    return json.dumps(dict(record), ensure_ascii=False, separators=(",", ":"))


def prompt_text(record: Mapping[str, Any]) -> str:
    """The last user turn: what the labeler and the retrieval index embed."""
    for turn in reversed(record["conversation"]):
        if turn["role"] == "user":
            return turn["content"]
    return record["conversation"][-1]["content"]


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out (texts shown beside a review task)."""
    return text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit:,} more characters]"


def normalize_text(text: str) -> str:
    """Ingest normalisation: Unicode NFC and surrounding whitespace trimmed."""
    return unicodedata.normalize("NFC", text).strip()
