"""The shard writer: prefs.curated -> rolling Avro files under shards/<split>/ (``trainers.storage.shards``).

Records are buffered per partition and appended after ``shard_max_records`` records or
``shard_max_age_s`` seconds: each append goes to the partition's open file of each split, is
fsynced, and is committed to the partition's manifest (its record count, byte length and the next
offset) before the consumer offsets are committed. A file rolls at ``shard_roll_records`` records
or ``shard_roll_age_s`` seconds, so files hold many micro-batches, and runs of small closed files
are compacted (``shard_compact_min_files``). On (re)assignment a partition's open files are
truncated back to their committed length, files no manifest names are removed, and consumption
resumes at the later of the committed offset and the manifest's next offset, so a crash at any
point neither loses nor duplicates a row. Gold pairs reach prefs.curated from the aggregator
(a gold CuratedPair beside each VerifiedPair), so this writer reads one topic.

Only committed records reach a shard. The embedded broker delivers the records of aborted
transactions to read_committed consumers; the worker and the aggregator stamp their outputs and mark
prefs.curated (streams/kafka/committed.py), and a ``CommittedFilter`` releases each partition's records
in order once it knows whether their transaction committed: a batch aborted and redone with another
route leaves exactly the redone rows. A record waits for that (until the stage's next transaction, or
its markers-only one when idle) before it is buffered, and offsets and the manifest's next offset never
pass a record still waiting, so a restart reads it again.

A pair is written once per identity (``streams.kafka.reader.curated_identity``: pair_id, gold or
routed), against a pair that comes twice (a replay). The identities already committed are read from
the partition's files once when the partition is assigned (another writer may have written it
meanwhile), then kept in memory; each append adds its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.committed import CommittedFilter
from streams.kafka.config import consumer_config
from streams.kafka.reader import curated_identity
from streams.runtime import metrics
from streams.settings import Settings, WorkerSettings
from trainers.exceptions import DataError, StoreAccessError
from trainers.storage.shards import MANIFEST, PartitionLog, compact_partition

__all__ = ["MANIFEST", "SHARD_GROUP", "ShardWriter"]

log = logging.getLogger(__name__)
SHARD_GROUP = "prefstream-shards"

# Wait between tries after a failed flush or commit (broker, disk or object store away).
RETRY_S = 1.0
# What a failed append, recovery or compaction raises when the disk or the object store fails.
STORAGE_ERRORS = (OSError, DataError, StoreAccessError)

class ShardWriter:
    def __init__(self, settings: Settings, wsettings: WorkerSettings, stop: threading.Event | None = None) -> None:
        self.settings, self.wsettings = settings, wsettings
        # PREFSTREAM_SHARDS_URL: appends go to the bucket, and a local mirror holds only what this writer
        # reads back (the identities of a partition's committed records); else PREFSTREAM_SHARDS_DIR.
        self.store = settings.shard_store()
        self.topic = settings.topic(topics.CURATED)
        self.codec = ValueCodec(settings.schema_registry_url)
        self.stop = stop or threading.Event()
        self.buffers: dict[int, list[tuple[int, dict]]] = defaultdict(list)
        self.started: dict[int, float] = {}
        self.consumer: Consumer | None = None
        self.failures = 0  # appends or commits that failed and were retried
        self.logs: dict[int, PartitionLog] = {}
        self.pending: dict[int, int] = {}  # partition -> offset to commit, its records already in the manifest
        self.skipped: dict[int, int] = {}  # partition -> offset to commit past records skipped with nothing buffered
        self.written: dict[int, set] = {}  # partition -> identities committed or in its buffer
        self.consumed: dict[int, int] = {}  # partition -> last offset released (buffered or skipped)
        self.filter = CommittedFilter()  # holds each record until its transaction is known to have committed
        self.duplicates = 0
        self.compacted = 0  # files merged away by automatic compaction
        self._compact_seen: dict[int, int] = {}  # partition -> its log's closed count at the last compaction
        self._summary_stale = False  # manifest.json lags the partitions' manifests

    def _log(self, partition: int) -> PartitionLog:
        if partition not in self.logs:
            self.logs[partition] = PartitionLog(self.store, self.topic, partition, self.wsettings.shard_roll_records,
                                                self.wsettings.shard_roll_age_s)
        return self.logs[partition]

    # -------------------------------------------------------------- assignment
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.filter.reset(tp.topic, tp.partition)  # read again from the committed position
        next_offset: dict[int, int] = {}
        for tp in partitions:
            recovered = self._recover(tp.partition)
            if recovered is None:  # stopping
                return
            next_offset[tp.partition] = recovered
        self._summary_stale = True
        try:
            self._write_summary_if_stale()
        except OSError as exc:  # only the summary for readers; the next flush writes it again
            log.warning("shard writer: cannot write the shard summary: %s", exc)
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
        out = []
        for tp in partitions:
            resume = max(committed.get(tp.partition, -1), next_offset.get(tp.partition, -1))
            out.append(TopicPartition(tp.topic, tp.partition, resume if resume > 0 else OFFSET_BEGINNING))
        consumer.assign(out)

    def _recover(self, partition: int) -> int | None:
        """The partition's committed position after recovery, retried while the disk fails.

        An exception out of this assignment callback would leave the partition unassigned for good
        (assign() is never reached), so its records would never be written; waiting is the only safe way.
        """
        while not self.stop.is_set():
            try:
                plog = self._log(partition)
                next_offset = plog.recover()["next_offset"]
                self.written[partition] = plog.identities(curated_identity)
                return next_offset
            except STORAGE_ERRORS as exc:
                self.failures += 1
                log.warning("shard writer: recovering %s[%d] failed: %s; retrying in %.0f s", self.topic, partition,
                            exc, RETRY_S)
                time.sleep(RETRY_S)
        return None

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._flush(tp.partition)
            for table in (self.buffers, self.written, self.consumed, self.logs, self.pending, self.skipped,
                          self._compact_seen):
                table.pop(tp.partition, None)
            self.filter.reset(tp.topic, tp.partition)
        self._write_summary_if_stale()

    # -------------------------------------------------------------- writing
    def _flush(self, partition: int) -> None:
        """Append the partition's buffer to its files, commit it to the manifest, then the offsets."""
        if self.consumer is None:
            return
        rows = self.buffers.get(partition)
        if rows:
            # Past the records skipped since the buffer began too (markers, dropped, repeated or unreadable ones).
            upto = max(rows[-1][0], self.consumed.get(partition, rows[-1][0])) + 1
            plog = self._log(partition)
            written = plog.append(rows, upto)
            # The records are in the manifest: a failed offset commit below is retried without them.
            self.buffers[partition] = []
            self.started.pop(partition, None)
            self.pending[partition] = upto
            for split, count in written.items():
                metrics.SHARD_ROWS.labels(split).inc(count)
            self._compact(plog)
            self._summary_stale = True
            self.skipped.pop(partition, None)  # upto is past them
        elif partition in self.skipped:
            self.pending[partition] = max(self.pending.get(partition, 0), self.skipped.pop(partition))
            self.started.pop(partition, None)
        if partition in self.pending:
            self.consumer.commit(offsets=[TopicPartition(self.topic, partition, self.pending[partition])],
                                 asynchronous=False)
            self.pending.pop(partition)

    def _compact(self, plog: PartitionLog) -> None:
        # Compaction merges closed files only: look again only after this log closed one (and once at first).
        if self.wsettings.shard_compact_min_files < 2 or self._compact_seen.get(plog.partition) == plog.closed:
            return
        try:
            done = compact_partition(self.store, plog.topic, plog.partition, self.wsettings.shard_roll_records,
                                     self.wsettings.shard_compact_min_files)
        except (DataError, StoreAccessError) as exc:  # the small files stay as they are and are still read; never stop writing
            log.error("compacting %s[%d] failed: %s", plog.topic, plog.partition, exc)
            return
        self._compact_seen[plog.partition] = plog.closed
        self.compacted += sum(c.sources for c in done)

    def _is_new(self, partition: int, rec: dict) -> bool:
        """Whether ``rec``'s identity is neither committed nor buffered for its partition; remembers it.

        Remembered when buffered: a buffer is always appended before it is dropped, and a failed
        append is retried with the buffer kept.
        """
        ids = self.written.setdefault(partition, set())
        key = curated_identity(rec)
        if key in ids:
            self.duplicates += 1
            log.debug("skipping a second copy of %s on %s[%d]", key, self.topic, partition)
            return False
        ids.add(key)
        return True

    def _flush_due(self, force: bool = False) -> None:
        now = time.monotonic()
        for part in list(self.pending):
            if not self.buffers.get(part):
                self._flush(part)  # an offset commit that failed after its append
        for part, rows in list(self.buffers.items()):
            if rows and (force or len(rows) >= self.wsettings.shard_max_records or now - self.started.get(part, now) >= self.wsettings.shard_max_age_s):
                self._flush(part)
        for part in list(self.skipped):
            if force or now - self.started.get(part, now) >= self.wsettings.shard_max_age_s:
                self._flush(part)
        for plog in list(self.logs.values()):
            if plog.close_aged():  # no record came to roll it
                self._compact(plog)
                self._summary_stale = True
        self._write_summary_if_stale()

    def _write_summary_if_stale(self) -> None:
        # Once per pass, not per partition flush: it reads every partition's manifest.
        if self._summary_stale:
            self.store.write_summary()
        self._summary_stale = False

    def run(self) -> None:
        self.store.local_root.mkdir(parents=True, exist_ok=True)
        self.consumer = consumer = Consumer(consumer_config(self.settings, f"{self.settings.topic_prefix}{SHARD_GROUP}",
                                                            background=True))
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self.stop.is_set():
                try:
                    self._step(consumer)
                except (KafkaException, OSError, StoreAccessError) as exc:
                    # The broker or the disk failed a commit or an append: the buffers are kept and the
                    # append is redone (the files are truncated back to the manifest's lengths first, and
                    # records the manifest already holds are skipped); a commit that never lands is
                    # covered by the manifest's next offset on assignment. The thread must not die: the
                    # worker would go on curating into nothing.
                    self.failures += 1
                    log.warning("shard writer: %s; retrying in %.0f s", exc, RETRY_S)
                    time.sleep(RETRY_S)
            self._flush_due(force=True)
        finally:
            consumer.close()

    def _step(self, consumer: Consumer) -> None:
        """One poll and whatever flushes are due."""
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            for released, committed in self.filter.add(msg):  # in offset order, once decided
                self._take(released, committed)
        self._flush_due()

    def _take(self, msg: Any, committed: bool) -> None:
        """Buffer a released record (``committed``: data of a committed transaction) or skip past it."""
        self.consumed[msg.partition()] = msg.offset()
        rec = None
        if committed:
            try:
                rec = self.codec.decode("CuratedPair", msg.value(), msg.headers(), self.topic)
            except Exception as exc:  # written by our own worker; an unreadable one is logged and skipped
                log.error("unreadable CuratedPair at %s[%s]@%s: %s", self.topic, msg.partition(), msg.offset(), exc)
        if rec is not None and not self._is_new(msg.partition(), rec):
            rec = None  # the pair came again (a replay): already written or buffered
        if rec is not None:
            self.buffers[msg.partition()].append((msg.offset(), rec))
            self.started.setdefault(msg.partition(), time.monotonic())
        elif not self.buffers[msg.partition()]:
            # Past it with nothing buffered (a marker, a dropped or repeated record): committed at the next
            # flush or after shard_max_age_s, not one broker round trip per record.
            self.skipped[msg.partition()] = msg.offset() + 1
            self.started.setdefault(msg.partition(), time.monotonic())
