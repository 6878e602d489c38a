"""The review work queue in Redis.

- ``pending`` (sorted set): tasks still needing verdicts, scored by priority (lower p first, then age).
- ``task:<id>``: the ReviewTask as JSON. ``seen:<id>``: annotators ever handed the task (an annotator
  never gets a task twice). ``done:<id>``: annotators who submitted. ``lease:<id>``: who holds the
  task now, with an expiry; a lapsed lease returns the task to the others.
- ``vote:<id>:<annotator>``: a vote being given; claimed atomically (with the lease and the verdicts
  checked in the same script) before the app produces the Annotation, so an annotator's concurrent
  submits put one Annotation on the topic.
- Leasing is one Lua script (find the first task this annotator has not seen and that nobody holds,
  take the lease, mark it seen), so two annotators can never get the same lease. It pages through
  at most ``lease_scan`` tasks from the head of the queue, so one call's work is bounded however long
  the queue grows. ``held:<annotator>`` (sorted set, scored by expiry) counts the leases one
  annotator holds, capped at ``max_leases``.
- Adding a task is one Lua script too: the task, its queue entry and the counter appear together.
- Once a task has its verdicts, its keys expire after ``retention_s`` (the aggregator still reads the
  task while it catches up; a day or a week is plenty).
- ``expert`` (sorted set): escalated tasks; one expert verdict closes them.

Everything lives in Redis, so the app can restart freely; if Redis itself was emptied the feeder
rebuilds the queue from prefs.review and prefs.annotations (see feeder.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from streams import history

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long the review threads wait between tries while Redis does not answer.
REDIS_RETRY_S = 1.0


def until_redis_answers(call: Callable[[], T], stop: threading.Event, what: str) -> T | None:
    """Run ``call``; while Redis cannot be reached, wait and try again (logged once per outage) until it
    answers, or return None once ``stop`` is set. The feeder and the aggregator run their Redis work
    through it, so a Redis restart pauses them instead of ending their threads."""
    failing = False
    while not stop.is_set():
        try:
            result = call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # BusyLoadingError (AOF replay) included
            if not failing:
                log.warning("Redis does not answer (%s) while %s; retrying every %.0f s", exc, what, REDIS_RETRY_S)
                failing = True
            time.sleep(REDIS_RETRY_S)
            continue
        if failing:
            log.info("Redis answers again; %s goes on", what)
        return result
    return None

VOTES_NEEDED = 3
DEFAULT_LEASE_S = 300
THROUGHPUT_WINDOW_S = 3600
# How long a claimed vote stays reserved for the request producing it: past any produce and flush
# (the app's delivery timeout), so only a request that died while producing leaves a claim to lapse.
VOTE_CLAIM_S = 60
DEFAULT_MAX_LEASES = 2
DEFAULT_LEASE_SCAN = 500
DEFAULT_RETENTION_S = 7 * 24 * 3600

# KEYS: queue, held:<annotator>. ARGV: key prefix, annotator, lease seconds, now, max leases, scan bound.
# Returns the task id, false when nothing is free for this annotator, or -1 when they hold too many.
_LEASE = """
local held, now, lease_s = KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', held, '-inf', now)
if redis.call('ZCARD', held) >= tonumber(ARGV[5]) then return -1 end
local scan, page, start = tonumber(ARGV[6]), 50, 0
while start < scan do
  local ids = redis.call('ZRANGE', KEYS[1], start, math.min(start + page, scan) - 1)
  for _, id in ipairs(ids) do
    local seen = ARGV[1] .. 'seen:' .. id
    if redis.call('SISMEMBER', seen, ARGV[2]) == 0 then
      if redis.call('SET', ARGV[1] .. 'lease:' .. id, ARGV[2], 'NX', 'EX', lease_s) then
        redis.call('SADD', seen, ARGV[2])
        redis.call('ZADD', held, now + lease_s, id)
        redis.call('EXPIRE', held, lease_s + 1)
        return id
      end
    end
  end
  if #ids < page then break end
  start = start + page
end
return false
"""

# KEYS: task:<id>, queue, stats:added, verdicts:<id>. ARGV: task JSON, priority, task id, verdicts needed.
# 1 when queued, 2 when new but already answered (a rebuild restored its verdicts first), 0 when known.
_ADD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('INCR', KEYS[3])
  if redis.call('HLEN', KEYS[4]) >= tonumber(ARGV[4]) then return 2 end
  redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: verdicts:<id>, lease:<id>, vote:<id>:<annotator>. ARGV: annotator, claim seconds.
# 'answered' when they gave their verdict already, 'not_holder' when the lease is not theirs, 'claimed'
# when this caller may produce their vote, 'busy' while another request of theirs is producing it.
_CLAIM = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'answered' end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'not_holder' end
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[2])) then return 'claimed' end
return 'busy'
"""

# KEYS: lease:<id>, held:<annotator>. ARGV: annotator, task id. Drops the lease only if it is theirs.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""


def _needed(task: dict[str, Any]) -> int:
    """Verdicts that close a task: one from an expert, else VOTES_NEEDED."""
    return 1 if task.get("expert") else VOTES_NEEDED


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
    def __init__(self, redis: Any, prefix: str = "", lease_s: int = DEFAULT_LEASE_S, max_leases: int = DEFAULT_MAX_LEASES,
                 lease_scan: int = DEFAULT_LEASE_SCAN, retention_s: int = DEFAULT_RETENTION_S) -> None:
        self.redis = redis
        self.topic_prefix = prefix
        self.prefix = f"{prefix}prefstream:review:"
        self.lease_s, self.max_leases, self.lease_scan, self.retention_s = lease_s, max_leases, lease_scan, retention_s
        self._lease = self.redis.register_script(_LEASE)
        self._add = self.redis.register_script(_ADD)
        self._release = self.redis.register_script(_RELEASE)
        self._claim = self.redis.register_script(_CLAIM)

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ------------------------------------------------------------------ filling
    def add(self, task: dict[str, Any]) -> bool:
        """Queue a ReviewTask (idempotent by task_id); expert tasks go to the expert queue."""
        tid = task["task_id"]
        queue = "expert" if task.get("expert") else "pending"
        keys = [self.k("task", tid), self.k(queue), self.k("stats", "added"), self.k("verdicts", tid)]
        added = self._add(keys=keys, args=[json.dumps(task), float(task["priority"]), tid, _needed(task)])
        if added == 2:  # every verdict it needs was restored before it: never offered again
            self._expire_decided(tid)
        elif added:
            history.add(self.redis, self.topic_prefix, history.QUEUE, {"added": 1})
        return bool(added)

    def task(self, tid: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.k("task", tid))
        return json.loads(raw) if raw else None

    # ------------------------------------------------------------------ leasing
    def lease(self, annotator: str, expert: bool = False) -> dict[str, Any] | None:
        """The next task for ``annotator`` (now leased to them), or None when there is none for them."""
        keys = [self.k("expert" if expert else "pending"), self.k("held", annotator)]
        tid = self._lease(keys=keys, args=[self.prefix, annotator, self.lease_s, time.time(), self.max_leases,
                                           self.lease_scan])
        if tid == -1:
            raise QueueError(409, f"{annotator} already holds {self.max_leases} leased task(s): submit a verdict for "
                                  f"one, or wait up to {self.lease_s} s for a lease to lapse")
        if not tid:
            return None
        return self.task(tid.decode() if isinstance(tid, bytes) else tid)

    def holder(self, tid: str) -> str | None:
        v = self.redis.get(self.k("lease", tid))
        return v.decode() if v else None

    # ------------------------------------------------------------------ verdicts
    def submit(self, tid: str, annotator: str, annotation: dict[str, Any]) -> Submitted:
        """Record a verdict; only the lease holder may submit, and a second submit returns the first."""
        prior = self.answered(tid, annotator)
        if prior is not None:
            return Submitted(prior, True, self.redis.hlen(self.k("verdicts", tid)))
        task = self.task(tid)
        if task is None:
            raise QueueError(404, f"no task {tid}")
        if self.holder(tid) != annotator:
            raise QueueError(403, f"task {tid} is not leased to {annotator} (the lease may have expired; ask for the next task)")
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.k("verdicts", tid), annotator, json.dumps(annotation))
        pipe.delete(self.k("vote", tid, annotator))  # the verdict itself now says the vote is given
        pipe.delete(self.k("lease", tid))
        pipe.zrem(self.k("held", annotator), tid)
        pipe.incr(self.k("stats", "verdicts"))
        pipe.hincrby(self.k("stats", "per_annotator"), annotator, 1)
        now = time.time()
        pipe.zadd(self.k("stats", "recent"), {f"{tid}:{annotator}": now})
        pipe.zremrangebyscore(self.k("stats", "recent"), 0, now - THROUGHPUT_WINDOW_S)
        pipe.hlen(self.k("verdicts", tid))
        votes = pipe.execute()[-1]
        self._close_if_complete(tid, task, votes)
        return Submitted(annotation, False, votes)

    def claim_vote(self, tid: str, annotator: str) -> bool:
        """Reserve ``annotator``'s one vote on the task, atomically, before it is produced: True when this
        caller may produce it (then ``submit`` records it, or ``release_vote`` gives it back), False when it
        is given already or another request of theirs is giving it. QueueError 403 if the lease is not theirs."""
        keys = [self.k("verdicts", tid), self.k("lease", tid), self.k("vote", tid, annotator)]
        state = self._claim(keys=keys, args=[annotator, VOTE_CLAIM_S])
        state = state.decode() if isinstance(state, bytes) else state
        if state == "not_holder":
            raise QueueError(403, f"task {tid} is not leased to {annotator} (the lease may have expired; ask for the next task)")
        return state == "claimed"

    def release_vote(self, tid: str, annotator: str) -> None:
        """Give back a claimed vote whose Annotation certainly did not reach Kafka, so a retry may give it."""
        self.redis.delete(self.k("vote", tid, annotator))

    def answered(self, tid: str, annotator: str) -> dict[str, Any] | None:
        """``annotator``'s verdict on the task if they gave one (their lease, if any, is given back), else None."""
        prior = self.redis.hget(self.k("verdicts", tid), annotator)
        if prior is None:
            return None
        self.release(tid, annotator)
        return json.loads(prior)

    def release(self, tid: str, annotator: str) -> None:
        """Give back ``annotator``'s lease on a task they have answered already, so it does not sit held
        (and out of everyone else's reach) until the lease lapses."""
        self._release(keys=[self.k("lease", tid), self.k("held", annotator)], args=[annotator, tid])

    def restore_verdict(self, tid: str, annotator: str, annotation: dict[str, Any]) -> None:
        """Rebuild path: a verdict read back from prefs.annotations (the task then needs only the rest).

        The rebuild restores verdicts before it re-adds tasks, so a task is never leasable while its
        earlier verdicts are still missing (annotators would answer it again)."""
        pipe = self.redis.pipeline()
        pipe.sadd(self.k("seen", tid), annotator)
        pipe.hsetnx(self.k("verdicts", tid), annotator, json.dumps(annotation))
        pipe.hlen(self.k("verdicts", tid))
        votes = pipe.execute()[-1]
        task = self.task(tid)
        if task:
            self._close_if_complete(tid, task, votes)

    def _close_if_complete(self, tid: str, task: dict[str, Any], votes: int) -> None:
        """A task with all its verdicts leaves the queue; its keys expire after the retention period."""
        if votes < _needed(task):
            return
        if self.redis.zrem(self.k("expert" if task.get("expert") else "pending"), tid):  # 0: closed before
            counts = {"closed": 1.0}
            if task.get("created_at"):  # the time from routing to the last verdict
                counts |= {"aged": 1.0, "age_s": max(0.0, time.time() - task["created_at"] / 1000)}
            history.add(self.redis, self.topic_prefix, history.QUEUE, counts)
        self._expire_decided(tid)

    def _expire_decided(self, tid: str) -> None:
        pipe = self.redis.pipeline()
        for key in (self.k("task", tid), self.k("verdicts", tid), self.k("seen", tid)):
            pipe.expire(key, self.retention_s)
        pipe.execute()

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        per = {k.decode(): int(v) for k, v in self.redis.hgetall(self.k("stats", "per_annotator")).items()}
        agree = {k.decode(): int(v) for k, v in self.redis.hgetall(self.k("stats", "agree")).items()}
        decided = {k.decode(): int(v) for k, v in self.redis.hgetall(self.k("stats", "decided")).items()}
        now = time.time()
        return {"pending": self.redis.zcard(self.k("pending")), "expert": self.redis.zcard(self.k("expert")),
                "verdicts_last_hour": self.redis.zcount(self.k("stats", "recent"), now - THROUGHPUT_WINDOW_S, now),
                "agreement_with_label": {a: agree.get(a, 0) / n for a, n in decided.items() if n},
                "added": int(self.redis.get(self.k("stats", "added")) or 0),
                "verdicts": int(self.redis.get(self.k("stats", "verdicts")) or 0), "per_annotator": per,
                "time": time.time()}
