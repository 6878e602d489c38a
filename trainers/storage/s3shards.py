"""Training shards in object storage (``PREFSTREAM_SHARDS_URL=s3://bucket/prefix``).

Layout under the prefix, the directory store's (trainers/storage/shards.py) with every file closed::

    <split>/<topic>.p<partition>.<first>-<last>.<id>.c.avro   one append of the shard writer, or a merge
    manifest/<topic>.p<partition>.json                    the partition's manifest; changed only by CAS

Objects never change once written. Each append of the shard writer uploads one object per split it
touches and then names them in the partition's manifest with a conditional PUT (trainers/storage/s3.py,
``update``), and only then are the consumer offsets committed: a record is in the bucket before
Kafka forgets it, and a crash at any point leaves either the old manifest (the append is redone from
Kafka) or the new one. The update checks that the manifest's ``next_offset`` is still the one the
append started from, so two writers racing for a partition during a rebalance never both add the
same records: the loser reads again and appends only what is missing. An object no manifest names
was left by such a race or a crash and is removed once older than STALE_S. Compaction merges runs of
small objects like the directory store: the merged object is uploaded, swapped into the manifest,
and only then are the old ones deleted.

Readers mirror the bucket into a local directory with the directory layout (``mirror``): each
manifest copied, each file it names downloaded once and checked against the sha256 in its entry
(names are never reused for other bytes, so a cached copy of the right size is the same file), and
the trainers read the mirror with trainers/storage/shards.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastavro import writer as avro_writer

from trainers.exceptions import DataError
from trainers.storage.files import sha256_file
from trainers.storage.s3 import S3Backend
from trainers.storage.shards import (
    CODEC,
    MANIFEST_DIR,
    TMP_DIR,
    Compacted,
    Manifest,
    _groups,
    iter_records,
    save_partition,
    shard_schema,
)

SETTING = "PREFSTREAM_SHARDS_URL"
# An object no manifest names and older than this was left by a crash or a lost race (a live
# append names its objects within seconds of uploading them).
STALE_S = 3600.0
MANIFEST_NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.json$")
MIRROR_ATTEMPTS = 3


class ManifestMoved(Exception):
    """The partition's manifest changed since it was read (another writer): read again and redo."""


def _empty(topic: str, partition: int) -> dict[str, Any]:
    return {"topic": topic, "partition": partition, "next_offset": 0, "files": []}


def _object_key(split: str, topic: str, partition: int, first: int, last: int) -> str:
    """A name no other upload uses: two writers racing for one partition upload the same offsets, and an
    Avro file's bytes differ with its random sync marker, so the loser must never overwrite the winner's
    object (its own is left unnamed and swept)."""
    return f"{split}/{topic}.p{partition}.{first:012d}-{last:012d}.{uuid.uuid4().hex[:8]}.c.avro"


def _encode(rows: list[tuple[int, dict[str, Any]]]) -> bytes:
    buf = io.BytesIO()
    avro_writer(buf, shard_schema(), [rec | {"source_offset": offset} for offset, rec in rows], codec=CODEC)
    return buf.getvalue()


class S3ShardStore:
    """The partitions' manifests and files in a bucket, through one S3Backend."""

    def __init__(self, backend: S3Backend) -> None:
        self.backend = backend
        self.location = backend.location

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None, client: Any = None) -> S3ShardStore:
        # The backend's cache directory holds model versions; the shard store never uses it.
        return cls(S3Backend.from_url(url, Path(TMP_DIR), endpoint_url, client=client, setting=SETTING))

    @staticmethod
    def manifest_key(topic: str, partition: int) -> str:
        return f"{MANIFEST_DIR}/{topic}.p{partition}.json"

    def load_partition(self, topic: str, partition: int) -> dict[str, Any]:
        raw = self.backend.read(self.manifest_key(topic, partition))
        if raw is None:
            return _empty(topic, partition)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise DataError(f"{self.location}/{self.manifest_key(topic, partition)} is not JSON ({exc}); it is only "
                            "replaced whole, so this is damage from outside: restore it from a backup") from exc

    def partitions(self) -> list[tuple[str, int]]:
        out = []
        for key, _ in self.backend.list(f"{MANIFEST_DIR}/"):
            m = MANIFEST_NAME.match(key.rpartition("/")[2])
            if m:
                out.append((m["topic"], int(m["part"])))
        return sorted(out)

    def manifest(self) -> Manifest:
        """Every partition's manifest (each read whole); enough for totals and positions, no file read."""
        man = Manifest(Path(self.location))
        for topic, part in self.partitions():
            man.partitions[(topic, part)] = self.load_partition(topic, part)
        return man

    def commit(self, topic: str, partition: int, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` to the partition's manifest by compare-and-swap; ``change`` raises ManifestMoved
        when the manifest is no longer the one its caller planned against."""
        def apply(current: bytes | None) -> bytes:
            state = json.loads(current) if current else _empty(topic, partition)
            change(state)
            state["updated_at"] = time.time()
            return json.dumps(state, indent=1).encode()

        return json.loads(self.backend.update(self.manifest_key(topic, partition), apply))

    def sweep(self, state: dict[str, Any], older_than_s: float = STALE_S) -> list[str]:
        """Delete the partition's objects its manifest does not name, once older than ``older_than_s``."""
        named = {e["file"] for e in state["files"]}
        prefix = f"{state['topic']}.p{state['partition']}."
        now, removed = time.time(), []
        for key, modified in self.backend.list(""):
            split, _, name = key.partition("/")
            if split == MANIFEST_DIR or not name.startswith(prefix) or key in named or now - modified < older_than_s:
                continue
            self.backend.delete(key)
            removed.append(key)
        return removed

    # ------------------------------------------------------------------ reading
    def mirror(self, root: Path, partitions: list[tuple[str, int]] | None = None) -> Path:
        """Copy the manifests (all, or those of ``partitions``) and the files they name into ``root``,
        which then reads like a shards directory. Returns ``root``."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for topic, part in partitions if partitions is not None else self.partitions():
            for _ in range(MIRROR_ATTEMPTS):  # a compaction may delete a file between the read and the download
                state = self.load_partition(topic, part)
                if all(self.fetch(root, e) for e in state["files"]):
                    save_partition(root, state)
                    break
            else:
                raise DataError(f"{self.location}: the files of {topic}[{part}] kept changing while they were "
                                "downloaded; try again")
        self._drop_unnamed(root)
        return root

    def fetch(self, root: Path, entry: dict[str, Any]) -> bool:
        """Download one file into the mirror unless it is there; False when it is gone from the bucket."""
        path = root / entry["file"]
        if path.is_file() and path.stat().st_size == entry["bytes"]:
            return True
        tmp = root / TMP_DIR / f"{path.name}.{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not self.backend.download(entry["file"], tmp):
                return False
            if entry.get("sha256") and sha256_file(tmp) != entry["sha256"]:
                raise DataError(f"{self.location}/{entry['file']} does not match the sha256 in its manifest: the "
                                "object was changed outside prefstream; restore it or remove its manifest entry")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _drop_unnamed(self, root: Path) -> None:
        # Files compaction replaced. Only old ones: another process sharing the mirror may have just
        # downloaded a file that a newer manifest than the one read here names.
        named = {e["file"] for m in (root / MANIFEST_DIR).glob("*.json") for e in json.loads(m.read_text())["files"]}
        now = time.time()
        for f in root.glob("*/*.avro"):
            rel = str(f.relative_to(root))
            if f.parent.name != TMP_DIR and rel not in named and now - f.stat().st_mtime > STALE_S:
                f.unlink(missing_ok=True)


class S3PartitionLog:
    """One partition's appends to the bucket: the shard writer's PartitionLog for PREFSTREAM_SHARDS_URL.

    Every append is one closed object per split, so there is nothing to roll by age; compaction
    (``compact_partition``) merges the small objects. ``mirror`` is a local directory for reading the
    partition back (``identities``).
    """

    def __init__(self, store: S3ShardStore, topic: str, partition: int, mirror: Path) -> None:
        self.store, self.topic, self.partition, self.mirror_root = store, topic, partition, Path(mirror)
        self.closed = 0  # objects this log wrote; a caller compacts only after it changed

    def recover(self) -> dict[str, Any]:
        """The partition's manifest, after removing objects left by crashed appends."""
        state = self.store.load_partition(self.topic, self.partition)
        self.store.sweep(state)
        return state

    def append(self, rows: list[tuple[int, dict[str, Any]]], next_offset: int) -> dict[str, int]:
        """Upload ``rows`` ((offset, CuratedPair) in offset order) and commit them with the position
        ``next_offset``. Rows the manifest already holds are skipped. Returns {split: records written}."""
        while True:
            state = self.store.load_partition(self.topic, self.partition)
            start = state["next_offset"]
            by_split: dict[str, list[tuple[int, dict]]] = defaultdict(list)
            for offset, rec in rows:
                if offset >= start:
                    by_split[rec["split"]].append((offset, rec))
            if not by_split and next_offset <= start:
                return {}
            entries = []
            for split, recs in sorted(by_split.items()):
                data = _encode(recs)
                key = _object_key(split, self.topic, self.partition, recs[0][0], recs[-1][0])
                self.store.backend.put(key, data)
                entries.append({"file": key, "split": split, "first_offset": recs[0][0], "last_offset": recs[-1][0],
                                "count": len(recs), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                "open": False, "created_at": time.time()})

            def change(current: dict[str, Any], start: int = start, entries: list = entries) -> None:
                if current["next_offset"] != start:
                    raise ManifestMoved
                current["files"] = current["files"] + entries
                current["next_offset"] = max(start, next_offset)

            try:
                self.store.commit(self.topic, self.partition, change)
            except ManifestMoved:
                continue  # another writer appended meanwhile: append what it did not
            self.closed += len(entries)
            return {e["split"]: e["count"] for e in entries}

    def close_aged(self) -> int:
        return 0  # every object is closed when written

    def identities(self, key: Any) -> set:
        """``key(record)`` for every committed record of the partition (read through the mirror)."""
        self.store.mirror(self.mirror_root, [(self.topic, self.partition)])
        state = json.loads((self.mirror_root / self.store.manifest_key(self.topic, self.partition)).read_text())
        entries = [e | {"topic": self.topic, "partition": self.partition} for e in state["files"]]
        return {key(rec) for _, rec in iter_records(self.mirror_root, entries=entries)}


def compact_partition(store: S3ShardStore, mirror: Path, topic: str, partition: int, target_records: int = 10_000,
                      min_files: int = 2) -> list[Compacted]:
    """Merge runs of small objects of each split into objects of up to ``target_records`` records:
    each merge is uploaded, swapped into the manifest by CAS (only if every source is still named),
    and then its sources are deleted. A crash leaves the sources in use or unnamed leftovers."""
    state = store.load_partition(topic, partition)
    store.sweep(state)
    by_split: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(state["files"], key=lambda e: (e["split"], e["first_offset"])):
        by_split[e["split"]].append(e)
    done: list[Compacted] = []
    for split, entries in sorted(by_split.items()):
        for group in _groups(entries, target_records, min_files):
            if not all(store.fetch(mirror, e) for e in group):
                continue  # compacted by another writer meanwhile
            src = [e | {"topic": topic, "partition": partition} for e in group]
            rows = [(rec["source_offset"], rec) for _, rec in iter_records(mirror, entries=src)]
            if len(rows) != sum(e["count"] for e in group):
                raise DataError(f"compacting {split} of {topic}[{partition}] in {store.location}: read {len(rows)} "
                                f"records from objects whose manifest entries hold {sum(e['count'] for e in group)}")
            data = _encode(rows)
            first, last = group[0]["first_offset"], group[-1]["last_offset"]
            key = _object_key(split, topic, partition, first, last)
            store.backend.put(key, data)
            merged = {"file": key, "split": split, "first_offset": first, "last_offset": last, "count": len(rows),
                      "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "open": False,
                      "created_at": group[0]["created_at"]}
            gone = {e["file"] for e in group}

            def change(current: dict[str, Any], gone: set = gone, merged: dict = merged) -> None:
                if not gone <= {e["file"] for e in current["files"]}:
                    raise ManifestMoved
                current["files"] = [e for e in current["files"] if e["file"] not in gone] + [merged]

            try:
                store.commit(topic, partition, change)
            except ManifestMoved:
                continue  # another compaction got there first; its sweep removes our merged object later
            for f in gone:
                store.backend.delete(f)
            done.append(Compacted(key, len(group), len(rows)))
    return done


def readable_root(location: str | Path, cache_dir: str | Path | None, endpoint_url: str | None = None) -> Path:
    """A local directory to read the shards at ``location`` from: the directory itself, or for an
    s3:// URL a mirror of it in ``cache_dir`` (brought up to date now)."""
    text = str(location)
    if not text.startswith("s3://"):
        return Path(text)
    if cache_dir is None:
        raise DataError(f"the shards at {text} are in object storage and need a local directory to mirror them into: "
                        "set PREFSTREAM_SHARDS_CACHE_DIR (or PREFSTREAM_HOME)")
    return S3ShardStore.from_url(text, endpoint_url).mirror(Path(cache_dir))

