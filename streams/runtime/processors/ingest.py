"""Ingest: decode, validate, normalise and deduplicate records from prefs.raw.

Never raises on input, a library's error on odd bytes included: every record becomes a pair, a
duplicate, or a dead letter with a typed reason. A pair that vouches for itself (metadata.answer or
metadata.tests) without a valid producer signature loses the vouch here (trust.py), before any stage
sees it.

Deduplication keeps ``pair_id -> "topic:partition:offset content-digest"`` in Redis with a TTL (the
claim). A record that meets its own claim again (a replay after a crash) is not a duplicate, so
replays lose nothing. Another record with the id and the same content (everything but ``created_at``)
is a duplicate and dropped; one with other content is dead-lettered as ``duplicate_id_conflict``,
never silently dropped. A pair dead-lettered by a later stage gives its claim back (:meth:`Ingestor.release`),
so the same pair replayed from the DLQ is processed, not taken for a duplicate of itself.

The pairs that pass are then checked by content, whatever their pair_id (dedupe.py): the same pair
seen before under another id, its responses swapped or not, is dead-lettered as ``duplicate``, a
nearly identical one as ``near_duplicate``, each naming the pair it repeats.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from schemas.exceptions import SchemaError
from schemas.pairs import normalize_text, validate_pair
from schemas.wire import ValueCodec
from streams.kafka.deadletter import dead_letter, from_exception
from streams.runtime.curation.dedupe import ContentDedupe
from streams.runtime.curation.trust import ProducerKeyring

__all__ = ["DEDUPE_PREFIX", "IngestResult", "Ingestor", "normalize"]

DEDUPE_PREFIX = "prefstream:dedupe:"
CONFLICT = "duplicate_id_conflict"
# Deletes a claim only while it is still this record's: another record may have claimed the id since.
RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass
class IngestResult:
    pair: dict[str, Any] | None = None
    dead_letter: dict[str, Any] | None = None
    duplicate: bool = False
    claim: str | None = None  # the dedupe claim this record holds in Redis
    held: list[tuple[str, str]] = field(default_factory=list)  # its content claims (key, value), dedupe.py

    @property
    def decoded(self) -> dict[str, Any]:
        """``pair``, where the caller has kept only the records that decoded to one."""
        if self.pair is None:
            raise LookupError("this record did not decode to a pair")
        return self.pair


def content_digest(pair: dict[str, Any]) -> str:
    """What a pair_id stands for: every field but the id and ``created_at`` (a resend may stamp a new time)."""
    content = {k: v for k, v in pair.items() if k not in ("pair_id", "created_at")}
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def normalize(pair: dict[str, Any]) -> dict[str, Any]:
    """NFC and trimmed text everywhere; validated again, since trimming can empty a field."""
    out = dict(pair)
    out["conversation"] = [{"role": t["role"], "content": normalize_text(t["content"])} for t in pair["conversation"]]
    out["chosen"], out["rejected"] = normalize_text(pair["chosen"]), normalize_text(pair["rejected"])
    return validate_pair(out)


class Ingestor:
    def __init__(self, codec: ValueCodec, redis: Any, dedupe_ttl_s: int, key_prefix: str = "",
                 keyring: ProducerKeyring | None = None, content: ContentDedupe | None = None) -> None:
        self.codec = codec
        self.content = content
        self.keyring = keyring or ProducerKeyring()
        self.redis = redis
        self.ttl = dedupe_ttl_s
        self.prefix = f"{key_prefix}{DEDUPE_PREFIX}"

    def decode(self, msg: Any) -> IngestResult:
        try:
            # The signature covers the pair as decoded, so the vouch is judged before normalisation.
            decoded = self.codec.decode("PreferencePair", msg.value(), msg.headers(), msg.topic())
            pair = normalize(self.keyring.admit(decoded, msg.headers()))
        except SchemaError as exc:
            return IngestResult(dead_letter=dead_letter(msg, getattr(exc, "reason", "invalid"), str(exc), "ingest",
                                                        type(exc).__name__))
        except Exception as exc:  # a decoder bug met by one record must not stop the batch
            return IngestResult(dead_letter=from_exception(msg, "ingest", exc))
        return IngestResult(pair=pair)

    def dedupe(self, results: list[tuple[Any, IngestResult]]) -> None:
        """Mark duplicates, and dead-letter id conflicts, in place with one Redis round trip for the whole batch."""
        todo = [(m, r) for m, r in results if r.pair is not None and r.dead_letter is None]
        if not todo:
            return
        pipe = self.redis.pipeline(transaction=False)
        claims = []
        for msg, r in todo:
            claim = f"{msg.topic()}:{msg.partition()}:{msg.offset()} {content_digest(r.decoded)}"
            claims.append(claim)
            pipe.set(self.prefix + r.decoded["pair_id"], claim, nx=True, ex=self.ttl)
            pipe.get(self.prefix + r.decoded["pair_id"])
        replies = pipe.execute()
        seen_in_batch: set[str] = set()
        for i, (msg, r) in enumerate(todo):
            owner = replies[2 * i + 1]
            pid = r.decoded["pair_id"]
            if owner is None or owner.decode() == claims[i]:
                if pid in seen_in_batch:  # no owner to compare with (Redis lost the key): keep the first copy
                    r.duplicate = True
                else:
                    r.claim = claims[i]
            else:
                first_at, _, first_digest = owner.decode().partition(" ")
                digest = claims[i].partition(" ")[2]
                if first_digest and first_digest != digest:  # a claim without a digest predates them: same content
                    r.dead_letter = dead_letter(
                        msg, CONFLICT, f"pair_id {pid!r} was first seen at {first_at} with other content (digest "
                        f"{first_digest[:12]}, this record's {digest[:12]}); a pair_id names one pair: give this "
                        "pair its own pair_id, or leave pair_id out for a content hash", "ingest", "DuplicateIdConflict")
                else:
                    r.duplicate = True
            seen_in_batch.add(pid)
        if self.content is not None:
            self._by_content(self.content, [(m, r) for m, r in todo if r.claim is not None])

    def _by_content(self, content: ContentDedupe, todo: list[tuple[Any, IngestResult]]) -> None:
        """Dead-letter the pairs that repeat, exactly or nearly, a pair seen under another pair_id (dedupe.py)."""
        verdicts = content.check([r.decoded for _, r in todo],
                                      [f"{m.topic()}:{m.partition()}:{m.offset()}" for m, _ in todo])
        repeated = []
        for (msg, r), v in zip(todo, verdicts, strict=True):
            r.held = v.held
            if v.reason is not None:
                r.dead_letter = dead_letter(msg, v.reason, v.detail, "ingest",
                                            "NearDuplicate" if v.reason == "near_duplicate" else "Duplicate")
                repeated.append(r)
        # A repeat holds no claim: replayed from the DLQ once the first pair is forgotten, it is processed.
        self.release(repeated)

    def release(self, results: list[IngestResult]) -> None:
        """Give back the dedupe claims of pairs a later stage dead-lettered: replayed, they are processed again."""
        held = [r for r in results if (r.claim is not None or r.held) and r.pair is not None]
        if not held:
            return
        pipe = self.redis.pipeline(transaction=False)
        for r in held:
            if r.claim is not None:
                pipe.eval(RELEASE_SCRIPT, 1, self.prefix + r.decoded["pair_id"], r.claim)
            for key, value in r.held:
                pipe.eval(RELEASE_SCRIPT, 1, key, value)
        pipe.execute()
        for r in held:
            r.claim, r.held = None, []
