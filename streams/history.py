"""Per-minute counters in Redis: what the deployment did when, for the stats page's charts.

Prometheus counters say how much happened since a process started; the stats page needs how much
happened in each minute, across workers and restarts, without a Prometheus server. Each series is one
Redis hash per minute (``<prefix>prefstream:history:<series>:<minute>``, fields -> counts) that expires after
RETENTION_S. The writers are the workers (routes, after the batch's transaction committed) and the
review queue (tasks added and closed, with the closed tasks' ages).

The counters are telemetry, not data: a Redis error while counting is logged and the count is lost
(the pairs, tasks and verdicts are not), and a batch counts once per commit. Neither ``review/`` nor
``runtime/`` owns this module, so both can write it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

BUCKET_S = 60
RETENTION_S = 24 * 3600
ROUTES = "routes"  # fields: route kinds (review, silver, flipped, verified_by_tool, deferred, dropped, ...)
QUEUE = "queue"  # fields: added, closed, aged and age_s (closed tasks with an age, and their ages' sum)


@dataclass(frozen=True)
class Bucket:
    start: int  # epoch seconds, a multiple of BUCKET_S
    counts: dict[str, float]


def _key(prefix: str, series: str, start: int) -> str:
    return f"{prefix}prefstream:history:{series}:{start}"


def bucket_of(now: float) -> int:
    return int(now // BUCKET_S) * BUCKET_S


def add(client: Any, prefix: str, series: str, counts: Mapping[str, float], now: float | None = None) -> None:
    """Add ``counts`` to this minute's bucket of ``series`` (one round trip); a Redis error is logged, not raised."""
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return
    key = _key(prefix, series, bucket_of(time.time() if now is None else now))
    try:
        pipe = client.pipeline(transaction=False)
        for field, value in counts.items():
            pipe.hincrbyfloat(key, field, float(value))
        pipe.expire(key, RETENTION_S)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not count %s in the %s history (the stats page's charts miss them): %s", dict(counts),
                    series, exc)


def read(client: Any, prefix: str, series: str, minutes: int, now: float | None = None) -> list[Bucket]:
    """The last ``minutes`` buckets of ``series``, oldest first, empty minutes included (as empty counts)."""
    last = bucket_of(time.time() if now is None else now)
    starts = [last - i * BUCKET_S for i in range(minutes - 1, -1, -1)]
    pipe = client.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(_key(prefix, series, start))
    return [Bucket(start, {k.decode(): float(v) for k, v in raw.items()}) for start, raw in zip(starts, pipe.execute(),
                                                                                              strict=True)]
