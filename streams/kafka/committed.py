"""Committed records only, on any broker: what a transactional stage stamps on its outputs, the markers
it writes, and the filter every reader of those outputs runs.

A read_committed consumer of the embedded broker (Tansu 0.6) also receives the records of aborted
transactions (docs/design.md, "The embedded broker"). A flag written inside a transaction cannot say
that the transaction committed: an aborted flag is delivered too. What an attempt (one try at
committing one micro-batch) can state truthfully, committed or not, is where the group's committed
offsets stood when it began: they move only when a transaction commits (offsets sent in an aborted
transaction never become visible, measured on Tansu as on Apache Kafka). So:

- Every output of an attempt carries the ``prefstream-txn`` header (``Stamp``): the attempt's id and,
  per input partition of its batch, the committed offset when it began (``lo``) and the batch's last
  offset (``hi``).
- Before it sends its input offsets, each attempt writes a marker (a record with a null value, the
  same header and ``prefstream-marker``) to every partition of every topic its stage writes. The
  marker also names each other input partition the stage holds, at its committed offset, covering
  nothing (``hi < lo``).
- A batch is always read from the committed offsets: after an abort the consumer rewinds to them, so
  the next attempt on a partition starts at the same ``lo``; after a commit the next starts past the
  batch. A reader decides an attempt A by the first marker, after A's rows, of another attempt that
  names one of A's input partitions: its ``lo`` is past A's ``lo`` -> A committed; its range covers
  A's ``lo`` -> the batch was redone, so A aborted; otherwise (a committed offset not yet past A's
  ``lo``, covering nothing) it waits for the next.
- A reader releases each partition's records in order, each once decided: a committed attempt's rows
  as data, an aborted attempt's rows dropped, markers dropped, records without the header (plain
  producers: the SDK, the review app) as data at once. A reader that commits offsets commits only
  what it released, so a restart reads the undecided records again.

The rows of a stage's last batch before a pause are decided by its next transaction, or by the
markers-only transaction it writes when it is idle (``BatchTransactions.anchor``); when a rebalance
moves the partition first, by the new holder's, which anchors every partition it gains, and anchors again
when a committed offset it asks later is past the one its markers named (a stale fetch). A batch with records
of a partition its stage no longer holds is never committed (``BatchTransactions.commit``): its rows would
follow the new holder's markers, and nothing would decide them. On a broker that
hides aborted records (Apache Kafka) a reader only sees committed attempts: the filter never drops a
row, it only waits for the next marker.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

log = logging.getLogger(__name__)

TXN_HEADER = "prefstream-txn"
MARKER_HEADER = "prefstream-marker"
# Rows of aborted transactions a reader dropped, by topic (the review app's, the worker's and the
# controller's /metrics show theirs); zero on a broker that hides aborted records.
DROPPED = Counter("prefstream_uncommitted_records_dropped_total",
                  "Records of aborted transactions (or with an unreadable prefstream-txn header) a reader dropped",
                  ["topic", "reason"])
# Parsed stamps kept per reader: every row of an attempt carries the same header bytes.
STAMP_CACHE = 4096
# Decided attempts remembered per partition, for rows of theirs that arrive after the decision.
DECIDED_MAX = 1024


@dataclass(frozen=True)
class Source:
    """One input partition of an attempt: the committed offset when it began and the batch's last offset.
    ``hi < lo``: the attempt read nothing there (its marker only says where the committed offset stood)."""

    topic: str
    partition: int
    lo: int
    hi: int

    @property
    def covers_records(self) -> bool:
        return self.hi >= self.lo


@dataclass(frozen=True)
class Stamp:
    """What the ``prefstream-txn`` header holds: the attempt's id and its input partitions."""

    attempt: str
    sources: tuple[Source, ...]
    _by_partition: dict[tuple[str, int], Source] = field(default_factory=dict, compare=False, repr=False)
    read_records: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_partition.update({(s.topic, s.partition): s for s in self.sources})
        # Whether the attempt read any input record (every row's check; computed once per stamp).
        object.__setattr__(self, "read_records", any(s.covers_records for s in self.sources))

    def encode(self) -> bytes:
        return json.dumps({"a": self.attempt, "s": [[s.topic, s.partition, s.lo, s.hi] for s in self.sources]},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Stamp:
        """The stamp in ``raw``; ValueError when it is not one."""
        try:
            doc = json.loads(raw)
            sources = tuple(Source(str(t), int(p), int(lo), int(hi)) for t, p, lo, hi in doc["s"])
            return cls(str(doc["a"]), sources)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a {TXN_HEADER} header: {raw[:80]!r} ({exc})") from exc

    def source(self, topic: str, partition: int) -> Source | None:
        return self._by_partition.get((topic, partition))


def outcome(attempt: Stamp, marker: Stamp) -> bool | None:
    """What ``marker`` (of a later attempt) says of ``attempt``: True committed, False aborted, None nothing."""
    if marker.attempt == attempt.attempt:
        return None
    for src in attempt.sources:
        if not src.covers_records:
            continue
        other = marker.source(src.topic, src.partition)
        if other is None:
            continue
        if other.lo > src.lo:
            return True  # the committed offset moved past where the attempt began: only it could move it
        if other.lo <= src.lo <= other.hi:
            return False  # a later attempt read the same records again: this one did not commit
    return None


def _stamp_headers(msg: Any) -> tuple[bytes | None, bool]:
    """The record's ``prefstream-txn`` header (None without one) and whether it is a marker."""
    raw, marker = None, False
    for key, value in msg.headers() or ():
        if key == TXN_HEADER:
            raw = value if value is not None else b""
        elif key == MARKER_HEADER:
            marker = True
    return raw, marker


# ------------------------------------------------------------------------------------------ producer side
class Marking:
    """The producer side, owned by a ``BatchTransactions``: each attempt's stamp and the partitions its
    markers go to. ``topics``: every topic the stage may write (a partition an aborted attempt wrote to
    must see the redo's marker even when the redo writes nothing there)."""

    def __init__(self, topics: Iterable[str]) -> None:
        self.topics = tuple(dict.fromkeys(topics))
        self.incarnation = uuid.uuid4().hex[:12]
        self.seq = 0
        # A committed transaction's rows wait for a later marker; set while the last one had rows.
        self.unanchored = True  # also at start: rows a predecessor committed last may be waiting

    def stamp(self, committed: Iterable[Any], msgs: Iterable[Any], positions: Iterable[Any] = ()) -> Stamp:
        """A new attempt's stamp: ``committed`` the group's committed offsets (TopicPartitions) of the
        partitions it holds, ``msgs`` the batch, ``positions`` the consumer's positions.

        ``lo`` is the committed offset, raised to where this attempt's reading began: the batch's first
        record on a partition it read, the consumer's position on one it did not. On the embedded broker a
        committed-offset fetch right after a commit can still return the offset before it; the consumer
        only reads on from a batch whose transaction committed (after an abort it rewinds), so where it
        reads from is the better witness, and a stale fetch must not make a committed batch look redone."""
        self.seq += 1
        first: dict[tuple[str, int], int] = {}
        last: dict[tuple[str, int], int] = {}
        for m in msgs:
            key = (m.topic(), m.partition())
            last[key] = max(last.get(key, -1), m.offset())
            first[key] = min(first.get(key, m.offset()), m.offset())
        at = {(tp.topic, tp.partition): max(tp.offset, 0) for tp in committed}
        for tp in positions:
            if tp.offset >= 0:
                at[(tp.topic, tp.partition)] = max(at.get((tp.topic, tp.partition), 0), tp.offset)
        sources = [Source(t, p, max(at.get((t, p), 0), first[(t, p)]), hi) for (t, p), hi in last.items()]
        sources += [Source(t, p, lo, lo - 1) for (t, p), lo in at.items() if (t, p) not in last]
        return Stamp(f"{self.incarnation}.{self.seq}", tuple(sources))


def stamped(headers: list | None, stamp: bytes) -> list:
    """``headers`` (left as they are) with the attempt's stamp added."""
    return [*(headers or ()), (TXN_HEADER, stamp)]


def marker_headers(stamp: bytes) -> list:
    return [(TXN_HEADER, stamp), (MARKER_HEADER, b"1")]


# ------------------------------------------------------------------------------------------ reader side
@dataclass
class _Partition:
    queue: deque = field(default_factory=deque)  # [msg, attempt id or None, keep or None] in offset order
    pending: dict[str, Stamp] = field(default_factory=dict)  # undecided attempts with rows in the queue
    decided: OrderedDict = field(default_factory=OrderedDict)  # attempt id -> committed


class CommittedFilter:
    """Releases each partition's records in order, each with whether it is committed data (see the module doc).

    ``add`` takes every record a consumer got and returns the records it releases, with True for data and
    False for what to skip (markers, rows of aborted attempts). ``held`` counts the records waiting for a
    decision; ``reset`` forgets a partition's state when its consumer seeks back (it reads them again).
    """

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._stamps: OrderedDict[bytes, Stamp | None] = OrderedDict()
        self.dropped = 0  # rows of aborted attempts
        self.unreadable = 0  # rows with a prefstream-txn header that is not a stamp

    def add(self, msg: Any) -> list[tuple[Any, bool]]:
        key = (msg.topic(), msg.partition())
        part = self._parts.get(key)
        if part is None:
            part = self._parts[key] = _Partition()
        raw, marker = _stamp_headers(msg)
        if raw is None:
            if not part.queue:
                return [(msg, True)]  # a plain producer's record, nothing held before it
            part.queue.append([msg, None, True])
            return self._release(part)
        stamp = self._stamp(raw)
        if stamp is None:
            self.unreadable += 1
            DROPPED.labels(msg.topic(), "unreadable_stamp").inc()
            log.error("%s[%d]@%d carries an unreadable %s header; dropped (only prefstream's transactional stages "
                      "write it)", msg.topic(), msg.partition(), msg.offset(), TXN_HEADER)
            part.queue.append([msg, None, False])
        elif marker:
            self._decide(part, stamp)
            part.queue.append([msg, None, False])
        elif stamp.attempt in part.decided:
            part.queue.append([msg, stamp.attempt, None])
        elif not stamp.read_records:
            # No input batch to decide it by: not a consume-transform-produce output.
            self.unreadable += 1
            DROPPED.labels(msg.topic(), "no_source").inc()
            log.error("%s[%d]@%d: its %s header names no input records; dropped", msg.topic(), msg.partition(),
                      msg.offset(), TXN_HEADER)
            part.queue.append([msg, None, False])
        else:
            part.pending.setdefault(stamp.attempt, stamp)
            part.queue.append([msg, stamp.attempt, None])
        return self._release(part)

    def _stamp(self, raw: bytes) -> Stamp | None:
        if raw in self._stamps:
            self._stamps.move_to_end(raw)
            return self._stamps[raw]
        try:
            stamp: Stamp | None = Stamp.decode(raw)
        except ValueError:
            stamp = None
        self._stamps[raw] = stamp
        if len(self._stamps) > STAMP_CACHE:
            self._stamps.popitem(last=False)
        return stamp

    def _decide(self, part: _Partition, marker: Stamp) -> None:
        for attempt_id, stamp in list(part.pending.items()):
            verdict = outcome(stamp, marker)
            if verdict is not None:
                del part.pending[attempt_id]
                part.decided[attempt_id] = verdict
                if len(part.decided) > DECIDED_MAX:
                    part.decided.popitem(last=False)

    def _release(self, part: _Partition) -> list[tuple[Any, bool]]:
        out = []
        while part.queue:
            msg, attempt_id, keep = part.queue[0]
            if attempt_id is not None:
                keep = part.decided.get(attempt_id)
                if keep is None:
                    break
                if not keep:
                    self.dropped += 1
                    DROPPED.labels(msg.topic(), "aborted").inc()
            part.queue.popleft()
            out.append((msg, keep))
        return out

    def held(self, topic: str | None = None, partition: int | None = None) -> int:
        """Records waiting for a decision (of one partition, or of all)."""
        if topic is not None and partition is not None:
            part = self._parts.get((topic, partition))
            return len(part.queue) if part else 0
        return sum(len(p.queue) for p in self._parts.values())

    def reset(self, topic: str, partition: int) -> None:
        """Forget a partition: its consumer seeks back and reads the held records (and what decides them) again."""
        self._parts.pop((topic, partition), None)

    def reset_all(self) -> None:
        self._parts.clear()
