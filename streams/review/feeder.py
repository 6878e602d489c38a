"""Feeds prefs.review into the Redis queue; rebuilds the queue when Redis was emptied.

Tasks are added idempotently (by task_id), so replaying the topic is harmless. A marker key tells
whether this Redis has been filled before: when it is missing (a new or wiped Redis), the feeder
first re-reads prefs.review and prefs.annotations from the beginning, restoring tasks and the
verdicts already given, and only then follows the topic with its consumer group.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import Consumer

from schemas.wire import ValueCodec
from streams import topics
from streams.kafka_config import consumer_config
from streams.review.queue import ReviewQueue
from streams.sdk import TopicReader
from streams.settings import Settings

log = logging.getLogger(__name__)
REBUILD_IDLE_S = 2.0


class Feeder:
    def __init__(self, settings: Settings, queue: ReviewQueue) -> None:
        self.s, self.q = settings, queue
        self.codec = ValueCodec(settings.schema_registry_url)
        self.stop = threading.Event()
        self.marker = queue.k("initialized")

    def rebuild_if_empty(self) -> int:
        if self.q.r.exists(self.marker):
            return 0
        n = 0
        with TopicReader(self.s.topic(topics.REVIEW), "ReviewTask", self.s) as reader:
            for task in reader.records(idle_timeout=REBUILD_IDLE_S):
                n += self.q.add(task)
        with TopicReader(self.s.topic(topics.ANNOTATIONS), "Annotation", self.s) as reader:
            for ann in reader.records(idle_timeout=REBUILD_IDLE_S):
                self.q.restore_verdict(ann["task_id"], ann["annotator"], ann)
        self.q.r.set(self.marker, "1")
        if n:
            log.info("rebuilt the review queue from the topics: %d tasks", n)
        return n

    def run(self) -> None:
        self.rebuild_if_empty()
        consumer = Consumer(consumer_config(self.s, f"{self.s.topic_prefix}prefstream-review-feeder"))
        consumer.subscribe([self.s.topic(topics.REVIEW)])
        try:
            while not self.stop.is_set():
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                try:
                    self.q.add(self.codec.decode("ReviewTask", msg.value(), msg.headers()))
                except Exception as exc:  # one bad task must not stop the feed; it is logged
                    log.error("unreadable ReviewTask at offset %s: %s", msg.offset(), exc)
                consumer.commit(message=msg, asynchronous=False)
                if not self.q.r.exists(self.marker):  # Redis was wiped while running
                    self.rebuild_if_empty()
        finally:
            consumer.close()


def start(settings: Settings, queue: ReviewQueue) -> tuple[Feeder, Any]:
    feeder = Feeder(settings, queue)
    thread = threading.Thread(target=feeder.run, name="review-feeder", daemon=True)
    thread.start()
    return feeder, thread
