"""Ingest: decode, validate, normalise and deduplicate records from prefs.raw.

Never raises on input: every record becomes a pair, a duplicate, or a dead letter with a typed
reason. Deduplication keeps ``pair_id -> partition:offset`` in Redis with a TTL; a record that
meets its own claim again (a replay after a crash) is not a duplicate, so replays lose nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from schemas.exceptions import SchemaError
from schemas.pairs import normalize_text, validate_pair
from schemas.wire import ValueCodec

DEDUPE_PREFIX = "prefstream:dedupe:"
DEFAULT_DEDUPE_TTL_S = 7 * 24 * 3600


@dataclass
class IngestResult:
    pair: dict[str, Any] | None = None
    dead_letter: dict[str, Any] | None = None
    duplicate: bool = False


def dead_letter(msg: Any, reason: str, detail: str, processor: str) -> dict[str, Any]:
    headers = {k: (v or b"") for k, v in (msg.headers() or [])}
    return {
        "original_key": msg.key(), "original_value": msg.value(), "original_headers": headers,
        "reason": reason, "detail": detail[:2000], "source_topic": msg.topic(), "source_partition": msg.partition(),
        "source_offset": msg.offset(), "processor": processor, "failed_at": int(time.time() * 1000),
    }


def normalize(pair: dict[str, Any]) -> dict[str, Any]:
    """NFC and trimmed text everywhere; validated again, since trimming can empty a field."""
    out = dict(pair)
    out["conversation"] = [{"role": t["role"], "content": normalize_text(t["content"])} for t in pair["conversation"]]
    out["chosen"], out["rejected"] = normalize_text(pair["chosen"]), normalize_text(pair["rejected"])
    return validate_pair(out)


class Ingestor:
    def __init__(self, codec: ValueCodec, redis: Any, dedupe_ttl_s: int = DEFAULT_DEDUPE_TTL_S, key_prefix: str = "") -> None:
        self.codec = codec
        self.redis = redis
        self.ttl = dedupe_ttl_s
        self.prefix = f"{key_prefix}{DEDUPE_PREFIX}"

    def decode(self, msg: Any) -> IngestResult:
        try:
            pair = normalize(self.codec.decode("PreferencePair", msg.value(), msg.headers(), msg.topic()))
        except SchemaError as exc:
            return IngestResult(dead_letter=dead_letter(msg, getattr(exc, "reason", "invalid"), str(exc), "ingest"))
        return IngestResult(pair=pair)

    def dedupe(self, results: list[tuple[Any, IngestResult]]) -> None:
        """Mark duplicates in place with one Redis round trip for the whole batch."""
        todo = [(m, r) for m, r in results if r.pair is not None]
        if not todo:
            return
        pipe = self.redis.pipeline(transaction=False)
        claims = []
        for msg, r in todo:
            claim = f"{msg.topic()}:{msg.partition()}:{msg.offset()}"
            claims.append(claim)
            pipe.set(self.prefix + r.pair["pair_id"], claim, nx=True, ex=self.ttl)
            pipe.get(self.prefix + r.pair["pair_id"])
        replies = pipe.execute()
        seen_in_batch: set[str] = set()
        for i, (_msg, r) in enumerate(todo):
            owner = replies[2 * i + 1]
            pid = r.pair["pair_id"]
            if (owner is not None and owner.decode() != claims[i]) or pid in seen_in_batch:
                r.duplicate = True
            seen_in_batch.add(pid)
