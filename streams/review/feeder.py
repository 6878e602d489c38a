"""Feeds prefs.review into the Redis queue; rebuilds the queue when Redis was emptied.

Tasks are added idempotently (by task_id), so replaying the topic is harmless. A marker key tells
whether this Redis has been filled before: when it is missing (a new or wiped Redis), the feeder
first re-reads prefs.review and prefs.annotations from the beginning, restoring tasks and the
verdicts already given (to the queue and to the aggregator's vote counts, so a task that had 1 or 2
verdicts needs only the rest), and only then follows the topic with its consumer group. The marker is
looked at between tasks and whenever the topic is idle, so a wipe is noticed within FEED_IDLE_S.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from schemas.exceptions import SchemaError
from streams.kafka import topics
from streams.kafka.reader import TopicReader
from streams.review.aggregator import restore_vote
from streams.review.queue import ReviewQueue, until_redis_answers
from streams.settings import Settings

log = logging.getLogger(__name__)
REBUILD_IDLE_S = 2.0
FEED_IDLE_S = 0.5  # how often the feed loop looks at its stop flag when no task arrives


class Feeder:
    def __init__(self, settings: Settings, queue: ReviewQueue) -> None:
        self.settings, self.queue = settings, queue
        self.stop = threading.Event()
        self.marker = queue.k("initialized")

    def rebuild_if_empty(self) -> int:
        if self.queue.redis.exists(self.marker):
            return 0
        n = 0
        with TopicReader(self.settings.topic(topics.REVIEW), "ReviewTask", self.settings) as reader:
            for task in reader.records(idle_timeout=REBUILD_IDLE_S):
                n += self.queue.add(task)
        with TopicReader(self.settings.topic(topics.ANNOTATIONS), "Annotation", self.settings) as reader:
            for ann in reader.records(idle_timeout=REBUILD_IDLE_S):
                self.queue.restore_verdict(ann["task_id"], ann["annotator"], ann)
                restore_vote(self.queue.redis, self.settings.topic_prefix, ann)
        self.queue.redis.set(self.marker, "1")
        if n:
            log.info("rebuilt the review queue from the topics: %d tasks", n)
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
                    until_redis_answers(lambda task=task: self.queue.add(task), self.stop, "queueing review tasks")
                    until_redis_answers(self.rebuild_if_empty, self.stop, "rebuilding the review queue")
                    if self.stop.is_set():
                        break

def start(settings: Settings, queue: ReviewQueue) -> tuple[Feeder, Any]:
    feeder = Feeder(settings, queue)
    thread = threading.Thread(target=feeder.run, name="review-feeder", daemon=True)
    thread.start()
    return feeder, thread
