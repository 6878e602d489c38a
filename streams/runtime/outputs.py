"""The records the worker writes for one routed pair: ScoredPair, ReviewTask and CuratedPair.

Kept apart from the worker's loop so the rules about their content (priority, flipping, how many
similar pairs fit) are in one place and testable without Kafka.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from schemas.records import SimilarPair
from schemas.wire import ValueCodec
from streams.exceptions import OutputTooLargeError, ProcessingError
from streams.kafka import deadletter, topics
from streams.kafka.topics import MAX_MESSAGE_BYTES
from streams.kafka.transactions import Output
from streams.runtime.processors.router import Route

log = logging.getLogger(__name__)
# Review priority is p plus the pair's age as a tie-break: created_at (epoch ms, ~1.7e12) divided by
# this stays below 1e-3, so it never reorders pairs whose p differ by more than that.
PRIORITY_AGE_SCALE = 1e16
# Largest value the worker writes: the topics' max.message.bytes less room for the key (a pair_id of
# at most 128 characters), the schema header and the record batch's own overhead.
OUTPUT_LIMIT = MAX_MESSAGE_BYTES - (64 << 10)
# What one similar pair costs in a ReviewTask besides its texts (ids, label source, similarity, framing).
NEIGHBOUR_OVERHEAD = 256


def check_score(score: dict[str, Any]) -> None:
    """A model that gives a pair a NaN or infinite reward cannot route it: that pair is dead-lettered."""
    for key in ("reward_chosen", "reward_rejected", "p", "gold_reward_chosen", "gold_reward_rejected", "gold_p"):
        value = score.get(key)
        if value is not None and not math.isfinite(value):
            raise ProcessingError(f"the model gave {key}={value} for this pair; the pair cannot be routed "
                                  "(report the pair with the model version)", "non_finite_score", "score")


def scored_record(pair: dict, score: dict, decision: Route) -> dict[str, Any]:
    return {"pair": pair, **score, "route": decision.kind, "route_reason": decision.reason}


def fit_neighbours(neighbours: list[SimilarPair], budget: int) -> list[SimilarPair]:
    """The similar pairs, most similar first, as many as fit in ``budget`` bytes."""
    out: list[SimilarPair] = []
    used = 0
    for n in neighbours:
        size = NEIGHBOUR_OVERHEAD + sum(len(n[f].encode("utf-8")) for f in ("pair_id", "prompt", "chosen", "rejected"))
        if used + size > budget:
            break
        used += size
        out.append(n)
    return out


def review_task(pair: dict, score: dict, decision: Route, neighbours: list[SimilarPair], now: int,
                pair_bytes: int, task_id: str) -> dict[str, Any]:
    """A ReviewTask (id ``task_id``, streams/review/task_ids.py) with the similar pairs that fit next to a
    pair of ``pair_bytes`` encoded bytes."""
    return {"task_id": task_id, "pair": pair, "p": score["p"],
            "margin": score["reward_chosen"] - score["reward_rejected"], "model_version": score["model_version"],
            # Severity first: lower p is served first; ties by age (created_at in ms, scaled down).
            "priority": score["p"] + pair["created_at"] / PRIORITY_AGE_SCALE, "reason": decision.reason,
            "similar": fit_neighbours(neighbours, OUTPUT_LIMIT - pair_bytes - (16 << 10)), "expert": False,
            "created_at": now}


def curated_record(pair: dict, score: dict, decision: Route, now: int) -> dict[str, Any]:
    trained = dict(pair)
    if decision.flip:
        trained["chosen"], trained["rejected"] = pair["rejected"], pair["chosen"]
    p_train = 1 - score["p"] if decision.flip else score["p"]
    return {"pair": trained, "split": decision.kind, "p": p_train, "model_version": score["model_version"],
            "reason": decision.reason, "curated_at": now}


class Emitter:
    """Encodes the worker's output records: refuses one its topic would not take, and never fails a DeadLetter."""

    def __init__(self, codec: ValueCodec, out_topics: dict[str, str]) -> None:
        self.codec, self.out_topics = codec, out_topics

    def out(self, name: str, schema: str, key: bytes | None, record: dict) -> Output:
        """One encoded output; ProcessingError (stage encode) if it does not encode or would pass the topic's limit."""
        topic = self.out_topics[name]
        try:
            value, headers = self.codec.encode(schema, record, topic)
        except Exception as exc:  # any encoder error is this record's, filed with its type
            raise ProcessingError(f"could not encode the {schema} for {topic}: {type(exc).__name__}: {exc}",
                                  getattr(exc, "reason", None) or "encode_failed", "encode") from exc
        if len(value) > OUTPUT_LIMIT:
            # The broker would refuse it, and with it the whole batch's transaction, again on every retry.
            raise OutputTooLargeError(f"the {schema} for {topic} would be {len(value):,} bytes; the topic takes at most "
                                      f"{OUTPUT_LIMIT:,}: shorten the pair's texts or metadata")
        return topic, key, value, headers

    def dead(self, msg: Any, record: dict) -> Output:
        """The encoded DeadLetter; without the original's bytes if even that would not encode."""
        deadletter.DLQ.labels(record["reason"]).inc()
        key = msg.key() if msg.key() is None or len(msg.key()) <= 1024 else None
        try:
            return self.out(topics.DLQ, "DeadLetter", key, record)
        except ProcessingError as exc:
            log.error("dead letter for %s[%s]@%s kept without its original: %s", msg.topic(), msg.partition(),
                      msg.offset(), exc)
            return self.out(topics.DLQ, "DeadLetter", None, deadletter.bare(record))

    def fail(self, msg: Any, stage: str, exc: BaseException) -> Output:
        """The DeadLetter for ``msg``, which stage ``stage`` raised ``exc`` on."""
        log.warning("%s[%s]@%s dead-lettered in %s: %s: %s", msg.topic(), msg.partition(), msg.offset(), stage,
                    type(exc).__name__, str(exc)[:300])
        return self.dead(msg, deadletter.from_exception(msg, stage, exc))
