"""The shard writer: prefs.curated -> Avro container files under shards/<split>/.

One flush covers an offset range of one partition and writes one file per split present, named

    shards/<split>/<topic>.p<partition>.<first>-<last>.<i>of<n>.n<count>.avro

Files are written to shards/.tmp, fsynced, renamed, the directory fsynced, and only then are the
offsets committed. On (re)assignment a partition resumes after the last *complete* flush group on
disk (all n files present), and stray members of an incomplete group are removed, so a crash at
any point neither loses nor duplicates a row. Gold pairs reach prefs.curated from the aggregator
(a gold CuratedPair beside each VerifiedPair), so this writer reads one topic.

A pair is written once per identity (``streams.kafka.reader.curated_identity``: pair_id, gold or
routed). The embedded broker delivers the records of aborted transactions to read_committed
consumers, so a batch the worker aborted and redid arrives twice; the second copy is skipped. The
identities already on disk are read from the partition's complete shard files once when the
partition is assigned (another writer may have written it meanwhile), then kept in memory; each
flush adds its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from fastavro import parse_schema
from fastavro import reader as avro_reader
from fastavro import writer as avro_writer

from schemas import registry
from schemas.wire import ValueCodec
from streams.kafka import topics
from streams.kafka.config import consumer_config
from streams.kafka.reader import curated_identity
from streams.runtime import metrics
from streams.settings import Settings, WorkerSettings
from trainers.registry import fsync_dir

log = logging.getLogger(__name__)
SHARD_GROUP = "prefstream-shards"
NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.(?P<first>\d+)-(?P<last>\d+)\.(?P<i>\d+)of(?P<n>\d+)\.n(?P<count>\d+)\.avro$")
MANIFEST = "manifest.json"


def scan(root: Path) -> tuple[dict[tuple[str, int], int], list[dict[str, Any]], list[Path]]:
    """(next offset per (topic, partition) from complete groups, shard list, members of incomplete groups)."""
    groups: dict[tuple, list[tuple[Path, dict]]] = defaultdict(list)
    for f in root.glob("*/*.avro"):
        m = NAME.match(f.name)
        if m and f.parent.name != ".tmp":
            g = m.groupdict()
            groups[(g["topic"], int(g["part"]), int(g["first"]), int(g["last"]), int(g["n"]))].append((f, g))
    next_offset: dict[tuple[str, int], int] = {}
    shards, incomplete = [], []
    for (topic, part, first, last, n), members in groups.items():
        if len(members) != n:
            incomplete.extend(f for f, _ in members)
            continue
        next_offset[(topic, part)] = max(next_offset.get((topic, part), 0), last + 1)
        for f, g in members:
            shards.append({"file": str(f.relative_to(root)), "split": f.parent.name, "topic": topic, "partition": part,
                           "first_offset": first, "last_offset": last, "count": int(g["count"])})
    return next_offset, sorted(shards, key=lambda s: s["file"]), incomplete


def written_identities(root: Path, shards: list[dict[str, Any]], parts: set[tuple[str, int]]) -> dict[tuple[str, int], set]:
    """The CuratedPair identities in the complete shard files (``shards`` from ``scan``) of ``parts``,
    streamed file by file (only the identities stay in memory)."""
    out: dict[tuple[str, int], set] = {tp: set() for tp in parts}
    for s in shards:
        tp = (s["topic"], s["partition"])
        if tp in out:
            with (root / s["file"]).open("rb") as fh:
                out[tp].update(curated_identity(rec) for rec in avro_reader(fh))
    return out


def write_manifest(root: Path) -> dict[str, Any]:
    _, shards, _ = scan(root)
    totals: dict[str, int] = defaultdict(int)
    for s in shards:
        totals[s["split"]] += s["count"]
    manifest = {"updated_at": time.time(), "totals": dict(totals), "shards": shards}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)
    return manifest


# Wait between tries after a failed flush or commit (broker or disk away).
RETRY_S = 1.0

class ShardWriter:
    def __init__(self, settings: Settings, wsettings: WorkerSettings, stop: threading.Event | None = None) -> None:
        self.settings, self.wsettings = settings, wsettings
        self.root = Path(settings.shards_dir)
        self.tmp = self.root / ".tmp"
        self.topic = settings.topic(topics.CURATED)
        self.codec = ValueCodec(settings.schema_registry_url)
        # The expanded schema: a shard file's header must be readable without our named-type table.
        self.schema = parse_schema(json.loads(registry.get("CuratedPair").expanded_json))
        self.stop = stop or threading.Event()
        self.buffers: dict[int, list[tuple[int, dict]]] = defaultdict(list)
        self.started: dict[int, float] = {}
        self.consumer: Consumer | None = None
        self.failures = 0  # flushes or commits that failed and were retried
        self.written: dict[int, set] = {}  # partition -> identities on disk or in its buffer
        self.consumed: dict[int, int] = {}  # partition -> last offset read (buffered or skipped)
        self.duplicates = 0

    # -------------------------------------------------------------- assignment
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        next_offset, shards, incomplete = scan(self.root)
        for f in incomplete:  # a flush interrupted between renames: its offsets were never committed
            log.warning("removing %s (incomplete flush group; the records will be rewritten)", f)
            f.unlink(missing_ok=True)
        on_disk = written_identities(self.root, shards, {(tp.topic, tp.partition) for tp in partitions})
        self.written.update({part: ids for (_, part), ids in on_disk.items()})
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=10)}
        out = []
        for tp in partitions:
            resume = max(committed.get((tp.topic, tp.partition), -1), next_offset.get((tp.topic, tp.partition), -1))
            out.append(TopicPartition(tp.topic, tp.partition, resume if resume >= 0 else OFFSET_BEGINNING))
        consumer.assign(out)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._flush(tp.partition)
            self.buffers.pop(tp.partition, None)
            self.written.pop(tp.partition, None)
            self.consumed.pop(tp.partition, None)

    # -------------------------------------------------------------- writing
    def _flush(self, partition: int) -> None:
        rows = self.buffers.get(partition)
        if not rows or self.consumer is None:
            return
        first, last = rows[0][0], rows[-1][0]
        by_split: dict[str, list[dict]] = defaultdict(list)
        for _, rec in rows:
            by_split[rec["split"]].append(rec)
        self.tmp.mkdir(parents=True, exist_ok=True)
        n = len(by_split)
        staged = []
        for i, (split, recs) in enumerate(sorted(by_split.items()), 1):
            name = f"{self.topic}.p{partition}.{first:012d}-{last:012d}.{i}of{n}.n{len(recs)}.avro"
            tmp = self.tmp / name
            with tmp.open("wb") as fh:
                avro_writer(fh, self.schema, recs, codec="deflate")
                fh.flush()
                os.fsync(fh.fileno())
            staged.append((tmp, self.root / split / name, split, len(recs)))
        for tmp, final, split, count in staged:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
            fsync_dir(final.parent)
            metrics.SHARD_ROWS.labels(split).inc(count)
        write_manifest(self.root)
        # Past the records skipped since the buffer began too (second copies, unreadable ones).
        upto = max(last, self.consumed.get(partition, last)) + 1
        self.consumer.commit(offsets=[TopicPartition(self.topic, partition, upto)], asynchronous=False)
        self.buffers[partition] = []
        self.started.pop(partition, None)

    def _is_new(self, partition: int, rec: dict) -> bool:
        """Whether ``rec``'s identity is neither on disk nor buffered for its partition; remembers it.

        Remembered when buffered: a buffer is always flushed before it is dropped, and a flush that
        fails ends the writer (the next one rebuilds the set from disk).
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
        for part, rows in list(self.buffers.items()):
            if rows and (force or len(rows) >= self.wsettings.shard_max_records or now - self.started.get(part, now) >= self.wsettings.shard_max_age_s):
                self._flush(part)

    def run(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.consumer = Consumer(consumer_config(self.settings, f"{self.settings.topic_prefix}{SHARD_GROUP}", background=True))
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self.stop.is_set():
                try:
                    self._step()
                except (KafkaException, OSError) as exc:
                    # The broker or the disk failed a commit or a flush: the buffers are kept and the
                    # flush is redone (same file names, renamed over atomically); a commit that never
                    # lands is covered by the resume scan of the files. The thread must not die: the
                    # worker would go on curating into nothing.
                    self.failures += 1
                    log.warning("shard writer: %s; retrying in %.0f s", exc, RETRY_S)
                    time.sleep(RETRY_S)
            self._flush_due(force=True)
        finally:
            self.consumer.close()

    def _step(self) -> None:
        """One poll and whatever flushes are due."""
        msg = self.consumer.poll(0.2)
        if msg is not None and not msg.error():
            self.consumed[msg.partition()] = msg.offset()
            try:
                rec = self.codec.decode("CuratedPair", msg.value(), msg.headers(), self.topic)
            except Exception as exc:  # written by our own worker; an unreadable one is logged and skipped
                log.error("unreadable CuratedPair at %s[%s]@%s: %s", self.topic, msg.partition(), msg.offset(), exc)
                rec = None
            if rec is not None and not self._is_new(msg.partition(), rec):
                rec = None  # a second copy (an aborted transaction, redone): already written or buffered
            if rec is not None:
                self.buffers[msg.partition()].append((msg.offset(), rec))
                self.started.setdefault(msg.partition(), time.monotonic())
            elif not self.buffers[msg.partition()]:
                self.consumer.commit(message=msg, asynchronous=False)
        self._flush_due()
