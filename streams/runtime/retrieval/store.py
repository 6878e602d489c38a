"""The retrieval index kept in Redis, so a restarted worker serves similar pairs at once and the error-driven
expansion (streams/runtime/expansion.py) can find a neighbour's route, p and whole pair.

Each routed pair is one field of a hash, pair_id -> its prompt embedding (float16, half the bytes of float32 and
well within the similarity ranking's precision) followed by a JSON record: the pair, its route, the model's p and
rewards and the version that scored it. A sorted set orders the pairs by when they were routed; past the capacity
(PREFSTREAM_WORKER_RETRIEVAL_PERSIST) the oldest are removed, as the in-memory index forgets its oldest. Workers
of a deployment write one store; each loads it at start and then adds only the pairs it routes itself, so a
neighbour another worker routed later is not in its in-memory index until it restarts.

A pair whose texts are long is stored with them clipped (``whole`` false): enough for a reviewer's context, not
for a review task of its own, so the expansion passes it by. A batch that is rolled back and redone writes the
same pairs again (a no-op but for the route, which the redo decides).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.pairs import clip, prompt_text
from streams.runtime.retrieval.index import NEIGHBOUR_TEXT_CHARS, NeighbourIndex

log = logging.getLogger(__name__)
# A pair whose JSON is longer is stored with clipped texts: 200,000 whole pairs of up to 4 MiB would not fit Redis.
WHOLE_PAIR_BYTES = 32 << 10
LOAD_CHUNK = 1000


def keys(prefix: str) -> tuple[str, str]:
    """(the hash of stored pairs, the sorted set of their routing times) of a deployment."""
    return f"{prefix}prefstream:retrieval:pairs", f"{prefix}prefstream:retrieval:order"


# KEYS: the order sorted set, the pairs hash. ARGV: capacity. Drops the oldest pairs past the capacity.
_EVICT = """
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if over <= 0 then return 0 end
local gone = redis.call('ZPOPMIN', KEYS[1], over)
for i = 1, #gone, 2 do redis.call('HDEL', KEYS[2], gone[i]) end
return over
"""


@dataclass(frozen=True)
class Stored:
    """What the store holds about one routed pair."""

    pair: dict[str, Any]
    whole: bool  # False: the texts were clipped (context only)
    route: str
    p: float
    reward_chosen: float
    reward_rejected: float
    model_version: str
    vec: np.ndarray


def entry(pair: dict[str, Any], score: dict[str, Any], route: str) -> dict[str, Any]:
    """The JSON part of a pair's stored value."""
    whole = len(json.dumps(pair)) <= WHOLE_PAIR_BYTES
    kept = pair if whole else {**pair, "chosen": clip(pair["chosen"], NEIGHBOUR_TEXT_CHARS),
                               "rejected": clip(pair["rejected"], NEIGHBOUR_TEXT_CHARS),
                               "conversation": [{**turn, "content": clip(turn.get("content") or "", NEIGHBOUR_TEXT_CHARS)}
                                                for turn in pair.get("conversation") or []],
                               "metadata": {}}
    return {"pair": kept, "whole": whole, "route": route, "p": score["p"], "reward_chosen": score["reward_chosen"],
            "reward_rejected": score["reward_rejected"], "model_version": score["model_version"]}


class IndexStore:
    """The Redis copy of the retrieval index of a deployment (``prefix``); ``capacity`` 0 turns it off."""

    def __init__(self, redis: Any, prefix: str, capacity: int, dim: int) -> None:
        self.redis, self.capacity, self.dim = redis, capacity, dim
        self.pairs_key, self.order_key = keys(prefix)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def save(self, vectors: np.ndarray, records: list[dict[str, Any]]) -> None:
        """Store routed pairs (``entry`` records, one per row of ``vectors``) and drop the oldest past the capacity."""
        if not self.enabled or not records:
            return
        now = time.time() * 1000
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.pairs_key, mapping={
            rec["pair"]["pair_id"]: vec.astype(np.float16).tobytes() + json.dumps(rec).encode()
            for vec, rec in zip(vectors, records, strict=True)})
        pipe.zadd(self.order_key, {rec["pair"]["pair_id"]: now for rec in records})
        # One script: a crash or a second worker between the pop and the delete would leave fields nothing evicts.
        pipe.eval(_EVICT, 2, self.order_key, self.pairs_key, self.capacity)
        pipe.execute()

    def _decode(self, raw: bytes | None) -> Stored | None:
        width = self.dim * 2
        if raw is None or len(raw) <= width:
            return None
        try:
            rec = json.loads(raw[width:])
        except ValueError:  # written by an embedder of another width: not comparable with this one's vectors
            return None
        return Stored(rec["pair"], rec["whole"], rec["route"], rec["p"], rec["reward_chosen"], rec["reward_rejected"],
                      rec["model_version"], np.frombuffer(raw[:width], dtype=np.float16).astype(np.float32))

    def get(self, pair_ids: list[str]) -> dict[str, Stored]:
        """The stored record of each of ``pair_ids`` the store has."""
        if not self.enabled or not pair_ids:
            return {}
        found = {}
        for pid, raw in zip(pair_ids, self.redis.hmget(self.pairs_key, pair_ids), strict=True):
            if (stored := self._decode(raw)) is not None:
                found[pid] = stored
        return found

    def load(self, index: NeighbourIndex) -> int:
        """Fill ``index`` with the stored pairs, oldest first (so the in-memory ring keeps the newest); how many."""
        if not self.enabled:
            return 0
        ids = [m.decode() if isinstance(m, bytes) else m for m in self.redis.zrange(self.order_key, -index.capacity, -1)]
        loaded = 0
        for start in range(0, len(ids), LOAD_CHUNK):
            chunk = ids[start: start + LOAD_CHUNK]
            got = self.get(chunk)
            if not got:
                continue
            rows = list(got.values())
            index.add(np.stack([s.vec for s in rows]),
                      [(s.pair["pair_id"], prompt_text(s.pair), s.pair["chosen"], s.pair["rejected"],
                        s.pair.get("label_source") or "") for s in rows])
            loaded += len(rows)
        return loaded
