"""One partition's appends to a shard store: what the shard writer commits every micro-batch with."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any

from trainers.storage.shards.layout import DEFAULT_ROLL_RECORDS, load_partition
from trainers.storage.shards.reading import iter_records
from trainers.storage.shards.store import ManifestMoved, ShardStore, as_store


class PartitionLog:
    """Appends one partition's records to per-split files and commits them to its manifest.

    ``append`` makes the records durable and then commits the manifest; only then may the caller
    commit the consumer offsets. Rows below the manifest's ``next_offset`` are already stored and
    skipped, so a retried append, or a second writer racing for the partition, never writes a record
    twice. In a directory a file stays open and rolls (is closed, and the next record of its split
    starts a new one) at ``roll_records`` records or ``roll_age_s`` seconds after it began; in a
    bucket every append is closed objects of at most ``roll_records`` records, and compaction merges
    the small ones.
    """

    def __init__(self, store: ShardStore | str | os.PathLike, topic: str, partition: int,
                 roll_records: int = DEFAULT_ROLL_RECORDS, roll_age_s: float = 300.0, clock: Any = time.time) -> None:
        self.store, self.topic, self.partition = as_store(store), topic, partition
        self.roll_records, self.roll_age_s = max(1, roll_records), roll_age_s
        self.clock = clock  # wall clock: a file's age must survive a restart
        # When this partition's oldest open file reaches the age threshold, from the last manifest this
        # writer committed (it alone appends to the partition); -inf until one was read. Saves a manifest
        # read per poll in close_aged.
        self._close_due_at = float("-inf")
        self.closed = 0  # files this log closed; a caller compacts only after it changed

    def _note_due(self, state: dict[str, Any]) -> None:
        opened = [e["created_at"] for e in state["files"] if e["open"]]
        self._close_due_at = min(opened) + self.roll_age_s if opened else float("inf")

    def load(self) -> dict[str, Any]:
        """The partition's manifest as committed now."""
        return self.store.load_partition(self.topic, self.partition)

    def recover(self) -> dict[str, Any]:
        """Before the first append: drop what crashed appends left. Returns the manifest."""
        state = self.store.recover(self.topic, self.partition)
        self._note_due(state)
        return state

    def _due(self, entry: dict[str, Any], now: float) -> bool:
        return entry["count"] >= self.roll_records or now - entry["created_at"] >= self.roll_age_s

    def append(self, rows: list[tuple[int, dict[str, Any]]], next_offset: int) -> dict[str, int]:
        """Commit ``rows`` ((offset, CuratedPair) in offset order) and the partition position
        ``next_offset``. Returns {split: records written}."""
        while True:
            with self.store.hold(self.topic, self.partition):
                state = self.store.load_partition(self.topic, self.partition)
                start = state["next_offset"]
                by_split: dict[str, list[tuple[int, dict]]] = defaultdict(list)
                for offset, rec in rows:
                    if offset >= start:
                        by_split[rec["split"]].append((offset, rec))
                if not by_split and next_offset <= start:
                    return {}
                touched, closed, written = self._write(state, by_split)
                # The manifest must still be the one the files were planned against: appended files
                # replace their entries, new ones are added, and the position moves on.
                def change(current: dict[str, Any], start: int = start, touched: dict = touched) -> None:
                    if current["next_offset"] != start:
                        raise ManifestMoved
                    at = {e["file"]: i for i, e in enumerate(current["files"])}
                    for name, entry in touched.items():
                        if name in at:
                            current["files"][at[name]] = entry
                        else:
                            current["files"].append(entry)
                    current["next_offset"] = max(start, next_offset)

                try:
                    state = self.store.commit(self.topic, self.partition, change)
                except ManifestMoved:
                    continue  # another writer appended meanwhile: append what it did not
            self.closed += closed
            self._note_due(state)
            return written

    def _write(self, state: dict[str, Any], by_split: dict[str, list[tuple[int, dict]]]
               ) -> tuple[dict[str, dict], int, dict[str, int]]:
        """Write each split's rows to its open file or new ones: (entries written or closed by name,
        files closed, {split: records written})."""
        touched: dict[str, dict] = {}
        closed = 0
        written: dict[str, int] = defaultdict(int)
        now = self.clock()
        for split, recs in sorted(by_split.items()):
            while recs:
                entry = next((e for e in state["files"] if e["split"] == split and e["open"]), None)
                if entry is not None and self._due(entry, now):
                    entry["open"] = False
                    touched[entry["file"]], entry = entry, None
                    closed += 1
                if entry is None:
                    first, last = recs[0][0], recs[: self.roll_records][-1][0]
                    entry = {"file": self.store.new_file(split, self.topic, self.partition, first, last),
                             "split": split, "first_offset": first, "last_offset": first, "count": 0, "bytes": 0,
                             "open": self.store.appendable, "created_at": now}
                    state["files"].append(entry)
                    closed += not entry["open"]
                take, recs = recs[: self.roll_records - entry["count"]], recs[self.roll_records - entry["count"]:]
                self.store.write(entry, take)
                touched[entry["file"]] = entry
                written[split] += len(take)
                if entry["open"] and entry["count"] >= self.roll_records:
                    entry["open"] = False
                    closed += 1
        return touched, closed, dict(written)

    def close_aged(self) -> int:
        """Close the open files past the age threshold (no record arrived to roll them). Returns how many."""
        now = self.clock()
        if not self.store.appendable or now < self._close_due_at:  # most polls: nothing open is old enough
            return 0
        with self.store.hold(self.topic, self.partition):
            state = self.store.load_partition(self.topic, self.partition)
            aged = {e["file"] for e in state["files"] if e["open"] and now - e["created_at"] >= self.roll_age_s}
            if aged:
                def change(current: dict[str, Any]) -> None:
                    for e in current["files"]:
                        if e["file"] in aged:
                            e["open"] = False

                state = self.store.commit(self.topic, self.partition, change)
            self.closed += len(aged)
            self._note_due(state)
            return len(aged)

    def identities(self, key: Any) -> set:
        """``key(record)`` for every committed record of the partition."""
        root = self.store.readable([(self.topic, self.partition)])
        state = load_partition(root, self.topic, self.partition)
        entries = [e | {"topic": self.topic, "partition": self.partition} for e in state["files"]]
        return {key(rec) for _, rec in iter_records(root, entries=entries)}
