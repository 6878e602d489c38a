"""DeadLetter records (schemas/avsc/DeadLetter.avsc): what a processor could not handle, and why.

Building one never raises: it is the last stop for a bad record, so anything odd about the
record (a huge value, undecodable header bytes, a message with lone surrogates) is made to fit
here rather than stopping the worker. The original is kept whole when it fits the DLQ topic's
max.message.bytes; otherwise its start is kept with the sha256 and size of the whole.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from prometheus_client import Counter

from streams.kafka.topics import MAX_MESSAGE_BYTES

# Counted by whoever sends a DeadLetter: the worker's stages and the review aggregator.
DLQ = Counter("prefstream_dlq_total", "Records sent to the dead-letter queue", ["reason"])

# What one DeadLetter may carry of the original: the whole record whenever the DeadLetter fits the
# DLQ topic's max.message.bytes (so it can be replayed as it was), else the start of the value. The
# key and headers are bounded first, and 256 KiB are left for the rest of the envelope (the detail is
# at most 2,000 characters), so the record always fits whatever the original was.
MAX_ORIGINAL_KEY = 16 << 10
MAX_ORIGINAL_HEADERS = 64 << 10
MAX_ORIGINAL_VALUE = MAX_MESSAGE_BYTES - MAX_ORIGINAL_HEADERS - MAX_ORIGINAL_KEY - (256 << 10)
MAX_DETAIL_CHARS = 2000


def clean_text(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` as valid UTF-8 (lone surrogates escaped: Avro strings must encode) and at most ``limit`` chars."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text):,} chars)"


def _headers(msg: Any) -> tuple[dict[str, bytes], bool]:
    out: dict[str, bytes] = {}
    used, truncated = 0, False
    for k, v in msg.headers() or []:
        key, val = clean_text(str(k), 256), bytes(v or b"")
        if used + len(key) + len(val) > MAX_ORIGINAL_HEADERS:
            truncated = True
            continue
        used += len(key) + len(val)
        out[key] = val
    return out, truncated


def dead_letter(msg: Any, reason: str, detail: str, processor: str, error_type: str = "") -> dict[str, Any]:
    """The DeadLetter record for consumed message ``msg`` rejected by stage ``processor``."""
    value, key = msg.value(), msg.key()
    headers, headers_cut = _headers(msg)
    value_cut = value is not None and len(value) > MAX_ORIGINAL_VALUE
    key_cut = key is not None and len(key) > MAX_ORIGINAL_KEY
    return {
        "original_key": key[:MAX_ORIGINAL_KEY] if key is not None else None,
        "original_value": value[:MAX_ORIGINAL_VALUE] if value is not None else None,
        "original_headers": headers,
        "reason": clean_text(reason, 64), "detail": clean_text(detail), "source_topic": msg.topic(),
        "source_partition": msg.partition(), "source_offset": msg.offset(), "processor": processor,
        "failed_at": int(time.time() * 1000), "error_type": error_type,
        "original_size": len(value) if value is not None else None,
        "original_sha256": hashlib.sha256(value).hexdigest() if value is not None else None,
        "original_truncated": bool(value_cut or key_cut or headers_cut),
    }


def from_exception(msg: Any, stage: str, exc: BaseException) -> dict[str, Any]:
    """A DeadLetter for ``msg`` from the exception a stage raised on it.

    Errors raised on purpose carry a typed ``reason`` (InvalidRecordError, ProcessingError); anything
    else is a processor bug met by this record, filed as ``processing_error`` with its type named.
    """
    reason = getattr(exc, "reason", None) or "processing_error"
    stage = getattr(exc, "stage", None) or stage
    detail = f"{stage}: {type(exc).__name__}: {exc}"
    return dead_letter(msg, str(reason), detail, stage, type(exc).__name__)


def bare(record: dict[str, Any]) -> dict[str, Any]:
    """The same DeadLetter without the original's bytes: the fallback when even the record will not encode."""
    return record | {"original_key": None, "original_value": None, "original_headers": {}, "original_truncated": True,
                     "detail": clean_text(record["detail"], 500)}
