"""Compaction: runs of small closed files of a split merged into larger ones, safe at any crash.

The merged file is written where no reader looks (``write_merged``), put in place and named in the
partition's manifest in one hold (only if every source is still named and closed), and only then are
the sources removed. A crash before the manifest changes leaves the sources in use (the merged copy
is swept later); after it, the sources are leftovers. Readers see the sources or the merged file,
never both, and a reader that took its manifest before finds a removed source's records in the file
that replaced it.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainers.exceptions import DataError
from trainers.storage.shards.layout import DEFAULT_ROLL_RECORDS
from trainers.storage.shards.reading import iter_records
from trainers.storage.shards.store import ManifestMoved, ShardStore, as_store


@dataclass
class Compacted:
    file: str
    sources: int
    records: int


def _groups(entries: list[dict[str, Any]], target: int, min_files: int) -> list[list[dict[str, Any]]]:
    """Runs of consecutive small closed files of one split, each run at most ``target`` records."""
    groups: list[list[dict[str, Any]]] = []
    run: list[dict[str, Any]] = []
    size = 0
    for e in entries + [None]:
        small = e if e is not None and not e["open"] and e["count"] < target else None
        if small is not None and size + small["count"] <= target:
            run.append(small)
            size += small["count"]
            continue
        if len(run) >= min_files:
            groups.append(run)
        run, size = ([small], small["count"]) if small is not None else ([], 0)
    return groups


def compact_partition(store: ShardStore | str | os.PathLike, topic: str, partition: int,
                      target_records: int = DEFAULT_ROLL_RECORDS, min_files: int = 2) -> list[Compacted]:
    """Merge runs of small closed files of each split of one partition into files of up to
    ``target_records`` records."""
    store = as_store(store)
    with store.hold(topic, partition):
        state = store.load_partition(topic, partition)
        store.sweep(state)  # what a crashed compaction or append left behind
    by_split: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(state["files"], key=lambda e: (e["split"], e["first_offset"])):
        by_split[e["split"]].append(e)
    done: list[Compacted] = []
    for split, entries in sorted(by_split.items()):
        for group in _groups(entries, target_records, min_files):
            merged = _merge(store, topic, partition, split, group)
            if merged is not None:
                done.append(Compacted(merged["file"], len(group), merged["count"]))
    return done


def _merge(store: ShardStore, topic: str, partition: int, split: str,
           group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Merge one run; its manifest entry, or None when another compaction got there first."""
    src = [e | {"topic": topic, "partition": partition} for e in group]
    root = store.local_copy(src)
    if root is None:
        return None  # a source is gone: compacted by another writer meanwhile
    expected, count = sum(e["count"] for e in group), 0

    def records() -> Iterator[dict[str, Any]]:
        nonlocal count
        for _, rec in iter_records(root, entries=src):
            count += 1
            yield rec

    merged = {"file": "", "split": split, "first_offset": group[0]["first_offset"],
              "last_offset": group[-1]["last_offset"], "count": 0, "bytes": 0, "open": False,
              "created_at": group[0]["created_at"]}
    store.write_merged(topic, partition, merged, records())
    if count != expected:
        store.discard(merged)
        raise DataError(f"compacting {split} of {topic}[{partition}] in {store.location}: read {count} records from "
                        f"files whose manifest entries hold {expected}")
    merged["count"] = count
    gone = {e["file"] for e in group}

    def change(current: dict[str, Any]) -> None:
        named = {e["file"]: e for e in current["files"]}
        if not all(f in named and not named[f]["open"] for f in gone):
            raise ManifestMoved
        current["files"] = [e for e in current["files"] if e["file"] not in gone] + [merged]

    try:
        with store.hold(topic, partition):
            change(copy.deepcopy(store.load_partition(topic, partition)))  # still to do: only then put it in place
            store.place(merged)
            store.commit(topic, partition, change)
            store.delete(sorted(gone))
    except ManifestMoved:
        store.discard(merged)
        return None
    return merged


def compact(store: ShardStore | str | os.PathLike, target_records: int = DEFAULT_ROLL_RECORDS,
            min_files: int = 2) -> list[Compacted]:
    """Compact every partition of a store (see ``compact_partition``)."""
    store = as_store(store)
    return [c for topic, part in store.partitions()
            for c in compact_partition(store, topic, part, target_records, min_files)]
