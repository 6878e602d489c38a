"""Feeds prefs.review into the Redis queue; rebuilds the queue when Redis was emptied.

Tasks are added idempotently (by task_id), so replaying the topic is harmless. A marker key tells
whether this Redis has been filled before: when it is missing (a new or wiped Redis), the feeder
first re-reads prefs.annotations and prefs.review from the beginning, restoring the verdicts already
given (to the queue and to the aggregator's vote counts, so a task that had 1 or 2 verdicts needs
only the rest) and then the tasks, and only then follows the topic with its consumer group. The marker is
looked at between tasks and whenever the topic is idle, so a wipe is noticed within FEED_IDLE_S.
"""

from __future__ import annotations

import logging
import threading
import uuid
from functools import partial
from typing import Any

from schemas.exceptions import SchemaError
from streams.kafka import topics
from streams.kafka.reader import TopicReader
from streams.keys import review_keys
from streams.review.aggregator import restore_vote
from streams.review.provenance import AnnotationKeys
from streams.review.queue import ReviewQueue, until_redis_answers
from streams.settings import ReviewSettings, Settings

log = logging.getLogger(__name__)
REBUILD_IDLE_S = 2.0
FEED_IDLE_S = 0.5  # how often the feed loop looks at its stop flag when no task arrives


# KEYS: rebuild token, marker. ARGV: this rebuild's token. Sets the marker (to the token, so the aggregator
# can tell one rebuild from the next) only if the token survived.
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class Feeder:
    def __init__(self, settings: Settings, queue: ReviewQueue, keys: AnnotationKeys | None = None) -> None:
        self.settings, self.queue = settings, queue
        # Only verdicts the review app signed are restored (provenance.py), as only those were counted.
        self.keys = keys or AnnotationKeys(review_keys(settings, ReviewSettings()))
        self.stop = threading.Event()
        self.marker = queue.k("initialized")
        self.rebuild_token = queue.k("rebuilding")
        self._finish = queue.redis.register_script(_FINISH)

    def rebuild_if_empty(self) -> int:
        """Restore a new or wiped Redis from the topics; the number of tasks restored (0 when it was filled)."""
        while not self.queue.redis.exists(self.marker):
            # A token written first and checked when done: Redis emptied again mid-rebuild (restarted
            # without its data) takes the token with it, and the marker must then not be set over a
            # half-restored queue; the rebuild starts over instead.
            token = uuid.uuid4().hex
            self.queue.redis.set(self.rebuild_token, token)
            n = self._restore()
            if self._finish(keys=[self.rebuild_token, self.marker], args=[token]):
                if n:
                    log.info("rebuilt the review queue from the topics: %d tasks", n)
                return n
            log.warning("Redis was emptied while the review queue was being rebuilt; rebuilding again")
        return 0

    def _restore(self) -> int:
        # Verdicts first: a task is leasable from the moment it is added, so its earlier verdicts (and who
        # gave them) must already be there, or annotators are asked again for work that was done.
        refused = 0
        with TopicReader(self.settings.topic(topics.ANNOTATIONS), "Annotation", self.settings) as reader:
            for msg in reader.messages(idle_timeout=REBUILD_IDLE_S):
                ann = reader.decode(msg).value
                if self.keys.check(ann, msg.headers()) is not None:  # the aggregator dead-lettered it already
                    refused += 1
                    continue
                self.queue.restore_verdict(ann["task_id"], ann["annotator"], ann)
                restore_vote(self.queue.redis, self.settings.topic_prefix, ann)
        if refused:
            log.warning("rebuild: %d annotation(s) not signed by the review app were not restored", refused)
        n = 0
        with TopicReader(self.settings.topic(topics.REVIEW), "ReviewTask", self.settings) as reader:
            for task in reader.records(idle_timeout=REBUILD_IDLE_S):
                n += self.queue.add(task)
        return n

    def run(self) -> None:
        until_redis_answers(self.rebuild_if_empty, self.stop, "rebuilding the review queue")
        # In a group: the reader commits a task's offset once the next one is asked for, i.e. after
        # the task is in Redis, so a feeder killed between the two re-adds it (add is idempotent).
        with TopicReader(self.settings.topic(topics.REVIEW), "ReviewTask", self.settings,
                         group=f"{self.settings.topic_prefix}prefstream-review-feeder") as reader:
            while not self.stop.is_set():
                # A no-op unless Redis was wiped (or restarted empty) while the topic was idle.
                until_redis_answers(self.rebuild_if_empty, self.stop, "rebuilding the review queue")
                for msg in reader.messages(idle_timeout=FEED_IDLE_S):
                    try:
                        task = reader.decode(msg).value
                    except SchemaError as exc:  # one bad task must not stop the feed; it is logged
                        log.error("unusable ReviewTask at %d@%d: %s", msg.partition(), msg.offset(), exc)
                        continue
                    # Waits out a Redis outage here: the offset is committed only after the add.
                    until_redis_answers(partial(self.queue.add, task), self.stop, "queueing review tasks")
                    until_redis_answers(self.rebuild_if_empty, self.stop, "rebuilding the review queue")
                    if self.stop.is_set():
                        break

def start(settings: Settings, queue: ReviewQueue) -> tuple[Feeder, Any]:
    feeder = Feeder(settings, queue)
    thread = threading.Thread(target=feeder.run, name="review-feeder", daemon=True)
    thread.start()
    return feeder, thread
