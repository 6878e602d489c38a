"""Review task ids: opaque, so an annotator cannot tell an audit, an expert task or a re-annotation from
any other task by its id.

A task id is a keyed BLAKE2b hash of the task's kind and its pair id. It is deterministic, so a worker
batch redone after a crash emits the same task and the queue adds it once; without the key nobody can
compute it, so an annotator who recomputes a pair's content hash (schemas/pairs.py) still cannot tell
which kind of task the id names. The key is 32 random bytes kept in Redis, created by the first process
that needs it; the worker, the aggregator and the review app read it there, and annotators never reach
Redis. Each process reads it once: if Redis loses its data, a process started afterwards makes a new key,
and tasks it makes then get ids the older processes cannot derive (the similar pairs' vote counts of those
tasks go unshown until the older processes restart).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

REVIEW, AUDIT, EXPERT, REANNOTATION = "review", "audit", "expert", "reannotation"
KINDS = (REVIEW, AUDIT, EXPERT, REANNOTATION)
KEY_BYTES = 32
ID_BYTES = 16  # 32 hex characters, like a uuid without dashes


def key_name(prefix: str) -> str:
    return f"{prefix}prefstream:review:task-id-key"


class TaskIds:
    """Task ids of one deployment (``prefix``: its topic prefix), from the key in ``redis``."""

    def __init__(self, redis: Any, prefix: str = "") -> None:
        self.redis, self.prefix = redis, prefix
        self._key: bytes | None = None

    def key(self) -> bytes:
        """The key, made on first use by whichever process comes first (SET NX), then read."""
        if self._key is None:
            name = key_name(self.prefix)
            pipe = self.redis.pipeline()
            pipe.set(name, secrets.token_hex(KEY_BYTES), nx=True)
            pipe.get(name)
            stored = pipe.execute()[1]
            self._key = bytes.fromhex(stored.decode() if isinstance(stored, bytes) else stored)
        return self._key

    def of(self, pair_id: str, kind: str = REVIEW) -> str:
        """The id of the ``kind`` task about ``pair_id``."""
        if kind not in KINDS:
            raise ValueError(f"task kind {kind!r} is not one of {', '.join(KINDS)}")
        return hashlib.blake2b(f"{kind}\0{pair_id}".encode(), key=self.key(), digest_size=ID_BYTES).hexdigest()
