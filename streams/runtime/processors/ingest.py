"""Ingest: decode, validate, normalise and deduplicate records from prefs.raw.

Never raises on input, a library's error on odd bytes included: every record becomes a pair, a
duplicate, or a dead letter with a typed reason. Deduplication keeps ``pair_id -> partition:offset`` in Redis with a TTL; a record that
meets its own claim again (a replay after a crash) is not a duplicate, so replays lose nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.exceptions import SchemaError
from schemas.pairs import normalize_text, validate_pair
from schemas.wire import ValueCodec
from streams.runtime.processors.deadletter import dead_letter, from_exception

__all__ = ["DEDUPE_PREFIX", "IngestResult", "Ingestor", "dead_letter", "normalize"]

DEDUPE_PREFIX = "prefstream:dedupe:"


@dataclass
class IngestResult:
    pair: dict[str, Any] | None = None
    dead_letter: dict[str, Any] | None = None
    duplicate: bool = False


def normalize(pair: dict[str, Any]) -> dict[str, Any]:
    """NFC and trimmed text everywhere; validated again, since trimming can empty a field."""
    out = dict(pair)
    out["conversation"] = [{"role": t["role"], "content": normalize_text(t["content"])} for t in pair["conversation"]]
    out["chosen"], out["rejected"] = normalize_text(pair["chosen"]), normalize_text(pair["rejected"])
    return validate_pair(out)


class Ingestor:
    def __init__(self, codec: ValueCodec, redis: Any, dedupe_ttl_s: int, key_prefix: str = "") -> None:
        self.codec = codec
        self.redis = redis
        self.ttl = dedupe_ttl_s
        self.prefix = f"{key_prefix}{DEDUPE_PREFIX}"

    def decode(self, msg: Any) -> IngestResult:
        try:
            pair = normalize(self.codec.decode("PreferencePair", msg.value(), msg.headers(), msg.topic()))
        except SchemaError as exc:
            return IngestResult(dead_letter=dead_letter(msg, getattr(exc, "reason", "invalid"), str(exc), "ingest",
                                                        type(exc).__name__))
        except Exception as exc:  # a decoder bug met by one record must not stop the batch
            return IngestResult(dead_letter=from_exception(msg, "ingest", exc))
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
