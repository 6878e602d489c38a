"""Which partitions a worker holds and how far behind it is on each, for /metrics and the logs.

The broker cannot be asked for this: Tansu's DescribeGroups returns no members, and its ListOffsets
"latest" on S3 storage answers the newest batch's base offset rather than the end of the partition
(docs/operations.md). So each worker reports its own assignment, from the group's rebalance
callbacks, and its lag per partition, from its own positions and the high watermark the broker sent
with the last fetch (``get_watermark_offsets(cached=True)``, which asks the broker nothing). A
rebalance resets the positions, so until a partition yields a record its lag counts from the group's
committed offset, fetched once per assignment.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, TopicPartition

from streams.runtime import metrics

log = logging.getLogger(__name__)
# A high watermark or position librdkafka does not know yet (no fetch answered, nothing consumed).
UNKNOWN_OFFSET = 0
COMMITTED_TIMEOUT_S = 2.0  # a broker slow to answer costs the worker's loop at most this, once per rebalance


def _names(parts: set[tuple[str, int]]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(parts)) or "none"


class Assignment:
    """Rebalance callbacks for ``Consumer.subscribe`` that keep the held partitions and export them."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.held: set[tuple[str, int]] = set()
        self.lag: dict[tuple[str, int], int] = {}
        # When the group last started to rebalance: subscribe, or the revoke that opened the rebalance.
        self._since = time.monotonic()
        self._before: set[tuple[str, int]] = set()  # what was held when that rebalance started
        # A rebalance resets every position, so a partition with no new record since has none: its lag
        # counts from the group's committed offset instead, asked once per assignment (OffsetFetch).
        self._unpositioned: set[tuple[str, int]] = set()
        self._committed: dict[tuple[str, int], int] = {}

    def subscribe(self, consumer: Consumer, topics: list[str]) -> None:
        self._since = time.monotonic()
        consumer.subscribe(topics, on_assign=self.on_assign, on_revoke=self.on_revoke, on_lost=self.on_lost)

    def on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._since = time.monotonic()
        self._before = set(self.held)
        self._drop({(tp.topic, tp.partition) for tp in partitions})

    def on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # Lost (the session expired) rather than handed over: the same bookkeeping, and said in the log.
        log.warning("group %s: partitions lost without a handover: %s", self.group,
                    _names({(tp.topic, tp.partition) for tp in partitions}))
        self.on_revoke(consumer, partitions)

    def on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        now = {(tp.topic, tp.partition) for tp in partitions}
        self.held |= now
        self._unpositioned |= now
        took = time.monotonic() - self._since
        gained, lost = self.held - self._before, self._before - self.held
        metrics.REBALANCES.inc()
        metrics.REBALANCE_SECONDS.observe(took)
        metrics.ASSIGNED_PARTITIONS.set(len(self.held))
        for topic, partition in now:
            metrics.PARTITION_ASSIGNED.labels(topic, str(partition)).set(1)
        log.info("group %s rebalanced in %.1f s: holds %s; gained %s; lost %s", self.group, took,
                 _names(self.held), _names(gained), _names(lost))
        self._before = set(self.held)

    def _drop(self, parts: set[tuple[str, int]]) -> None:
        self.held -= parts
        self._unpositioned -= parts
        for topic, partition in parts:
            self.lag.pop((topic, partition), None)
            self._committed.pop((topic, partition), None)
            for gauge in (metrics.PARTITION_ASSIGNED, metrics.PARTITION_LAG):
                try:
                    gauge.remove(topic, str(partition))
                except KeyError:
                    pass  # never exported (no lag yet)
        metrics.ASSIGNED_PARTITIONS.set(len(self.held))

    def update_lag(self, consumer: Consumer) -> dict[tuple[str, int], int]:
        """Lag of every held partition: the high watermark of the last fetch minus this worker's position
        (both local to the client), or minus the committed offset while no record was consumed since the
        assignment. A partition not fetched yet has no lag (unknown, not zero)."""
        if not self.held:
            return {}
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in sorted(self.held)])
        except KafkaException:
            return dict(self.lag)
        self._fetch_committed(consumer, {(tp.topic, tp.partition) for tp in positions if tp.offset < UNKNOWN_OFFSET})
        for tp in positions:
            key = (tp.topic, tp.partition)
            if key not in self.held:
                continue
            try:
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            at = tp.offset if tp.offset >= UNKNOWN_OFFSET else self._committed.get(key, OFFSET_INVALID)
            if high < UNKNOWN_OFFSET or at < UNKNOWN_OFFSET:
                continue
            self.lag[key] = max(0, high - at)
            metrics.PARTITION_LAG.labels(tp.topic, str(tp.partition)).set(self.lag[key])
        return dict(self.lag)

    def _fetch_committed(self, consumer: Consumer, unpositioned: set[tuple[str, int]]) -> None:
        """The group's committed offsets of the partitions without a position, asked once per assignment."""
        ask = unpositioned & self._unpositioned
        self._unpositioned.clear()  # asked now, or positioned already: not asked again until the next assignment
        if not ask:
            return
        try:
            committed = consumer.committed([TopicPartition(t, p) for t, p in sorted(ask)], timeout=COMMITTED_TIMEOUT_S)
        except KafkaException as exc:
            log.debug("committed offsets for the lag not available: %s", exc)
            return
        self._committed.update({(tp.topic, tp.partition): tp.offset for tp in committed})
