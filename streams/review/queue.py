"""The review work queue in Redis.

- ``pending`` (sorted set): tasks still needing verdicts, scored by priority (lower p first, then age).
- ``task:<id>``: the ReviewTask as JSON. ``seen:<id>``: annotators ever handed the task (an annotator
  never gets a task twice). ``done:<id>``: annotators who submitted. ``lease:<id>``: who holds the
  task now, with an expiry; a lapsed lease returns the task to the others.
- Leasing is one Lua script (find the first task this annotator has not seen and that nobody holds,
  take the lease, mark it seen), so two annotators can never get the same lease.
- ``expert`` (sorted set): escalated tasks; one expert verdict closes them.

Everything lives in Redis, so the app can restart freely; if Redis itself was emptied the feeder
rebuilds the queue from prefs.review and prefs.annotations (see feeder.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

VOTES_NEEDED = 3
DEFAULT_LEASE_S = 300
THROUGHPUT_WINDOW_S = 3600

_LEASE = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  local seen = ARGV[1] .. 'seen:' .. id
  if redis.call('SISMEMBER', seen, ARGV[2]) == 0 then
    if redis.call('SET', ARGV[1] .. 'lease:' .. id, ARGV[2], 'NX', 'EX', tonumber(ARGV[3])) then
      redis.call('SADD', seen, ARGV[2])
      return id
    end
  end
end
return false
"""


class QueueError(Exception):
    """A queue operation the caller may not do (answered as an HTTP error by the app)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass
class Submitted:
    annotation: dict[str, Any]
    duplicate: bool
    votes: int


class ReviewQueue:
    def __init__(self, redis: Any, prefix: str = "", lease_s: int = DEFAULT_LEASE_S) -> None:
        self.r = redis
        self.p = f"{prefix}prefstream:review:"
        self.lease_s = lease_s
        self._lease = self.r.register_script(_LEASE)

    def k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    # ------------------------------------------------------------------ filling
    def add(self, task: dict[str, Any]) -> bool:
        """Queue a ReviewTask (idempotent by task_id); expert tasks go to the expert queue."""
        tid = task["task_id"]
        if not self.r.set(self.k("task", tid), json.dumps(task), nx=True):
            return False
        queue = "expert" if task.get("expert") else "pending"
        self.r.zadd(self.k(queue), {tid: float(task["priority"])}, nx=True)
        self.r.incr(self.k("stats", "added"))
        return True

    def task(self, tid: str) -> dict[str, Any] | None:
        raw = self.r.get(self.k("task", tid))
        return json.loads(raw) if raw else None

    # ------------------------------------------------------------------ leasing
    def lease(self, annotator: str, expert: bool = False) -> dict[str, Any] | None:
        tid = self._lease(keys=[self.k("expert" if expert else "pending")], args=[self.p, annotator, self.lease_s])
        if not tid:
            return None
        return self.task(tid.decode() if isinstance(tid, bytes) else tid)

    def holder(self, tid: str) -> str | None:
        v = self.r.get(self.k("lease", tid))
        return v.decode() if v else None

    # ------------------------------------------------------------------ verdicts
    def submit(self, tid: str, annotator: str, annotation: dict[str, Any]) -> Submitted:
        """Record a verdict; only the lease holder may submit, and a second submit returns the first."""
        prior = self.r.hget(self.k("verdicts", tid), annotator)
        if prior is not None:
            return Submitted(json.loads(prior), True, self.r.hlen(self.k("verdicts", tid)))
        task = self.task(tid)
        if task is None:
            raise QueueError(404, f"no task {tid}")
        if self.holder(tid) != annotator:
            raise QueueError(403, f"task {tid} is not leased to {annotator} (the lease may have expired; ask for the next task)")
        pipe = self.r.pipeline()
        pipe.hsetnx(self.k("verdicts", tid), annotator, json.dumps(annotation))
        pipe.delete(self.k("lease", tid))
        pipe.incr(self.k("stats", "verdicts"))
        pipe.hincrby(self.k("stats", "per_annotator"), annotator, 1)
        now = time.time()
        pipe.zadd(self.k("stats", "recent"), {f"{tid}:{annotator}": now})
        pipe.zremrangebyscore(self.k("stats", "recent"), 0, now - THROUGHPUT_WINDOW_S)
        pipe.hlen(self.k("verdicts", tid))
        votes = pipe.execute()[-1]
        if task.get("expert") or votes >= VOTES_NEEDED:
            self.r.zrem(self.k("expert" if task.get("expert") else "pending"), tid)
        return Submitted(annotation, False, votes)

    def restore_verdict(self, tid: str, annotator: str, annotation: dict[str, Any]) -> None:
        """Rebuild path: a verdict read back from prefs.annotations."""
        self.r.sadd(self.k("seen", tid), annotator)
        self.r.hsetnx(self.k("verdicts", tid), annotator, json.dumps(annotation))
        task = self.task(tid)
        if task and (task.get("expert") or self.r.hlen(self.k("verdicts", tid)) >= VOTES_NEEDED):
            self.r.zrem(self.k("expert" if task.get("expert") else "pending"), tid)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        per = {k.decode(): int(v) for k, v in self.r.hgetall(self.k("stats", "per_annotator")).items()}
        agree = {k.decode(): int(v) for k, v in self.r.hgetall(self.k("stats", "agree")).items()}
        decided = {k.decode(): int(v) for k, v in self.r.hgetall(self.k("stats", "decided")).items()}
        now = time.time()
        return {"pending": self.r.zcard(self.k("pending")), "expert": self.r.zcard(self.k("expert")),
                "verdicts_last_hour": self.r.zcount(self.k("stats", "recent"), now - THROUGHPUT_WINDOW_S, now),
                "agreement_with_label": {a: agree.get(a, 0) / n for a, n in decided.items() if n},
                "added": int(self.r.get(self.k("stats", "added")) or 0),
                "verdicts": int(self.r.get(self.k("stats", "verdicts")) or 0), "per_annotator": per,
                "time": time.time()}
