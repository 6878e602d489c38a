"""The shard store: Avro files of curated pairs, their manifest, committed reads and compaction.

Layout under the shards root::

    <split>/<topic>.p<partition>.<first offset>.avro          a file the shard writer appends to (then closed)
    <split>/<topic>.p<partition>.<first>-<last>.c.avro        a file compaction merged from closed ones
    manifest/<topic>.p<partition>.json                         the partition's manifest (what readers trust)
    manifest/<topic>.p<partition>.lock                         flock held for every change of that manifest
    manifest.json                                               a summary of every partition's manifest

A partition's manifest lists its files per split in offset order, each with the committed record
count and byte length, whether it is still open for appends, and ``next_offset``: the prefs.curated
offset after the last committed record. A file is appended to (one Avro block per append, fsynced)
before its manifest is replaced, so bytes past the committed length belong to an append that was
never committed: readers stop at the committed length and the writer truncates them away. Each
partition has its own manifest because each partition has one writer at a time, and several writers
(one per worker process) share the shards root.

Every record carries ``source_offset``, its offset on prefs.curated, so a retrain's lineage is a
position per partition (``next_offset``) instead of a list of files, and stays true when compaction
replaces files. Files written before manifests existed (``<first>-<last>.<i>of<n>.n<count>.avro``
flush groups) are read as closed files, and a writer adopts its partitions' ones into their manifests.

Every change of a split directory or a manifest happens under the partition's lock, so a file that
no manifest names, seen under the lock, is left over from a crash and can be removed.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro import reader as avro_reader
from fastavro import writer as avro_writer

from schemas import registry
from trainers.exceptions import DataError
from trainers.storage.files import atomic_write, file_lock, fsync_dir

MANIFEST = "manifest.json"
MANIFEST_DIR = "manifest"
TMP_DIR = ".tmp"
CODEC = "deflate"
OPEN_NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.(?P<first>\d{12})\.avro$")
COMPACT_NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.(?P<first>\d{12})-(?P<last>\d{12})\.c\.avro$")
LEGACY_NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.(?P<first>\d+)-(?P<last>\d+)\.(?P<i>\d+)of(?P<n>\d+)"
                         r"\.n(?P<count>\d+)\.avro$")
# A compaction's staged file older than this was left by a crash (a live one takes seconds).
STALE_TMP_S = 3600.0


@lru_cache(maxsize=1)
def shard_schema() -> dict[str, Any]:
    """CuratedPair (expanded, so a file's header reads without our named-type table) plus the record's
    prefs.curated offset, which makes lineage positions survive compaction."""
    schema = json.loads(registry.get("CuratedPair").expanded_json)
    schema["fields"].append({"name": "source_offset", "type": "long", "default": -1,
                             "doc": "Offset of the record on prefs.curated; its partition is in the file name."})
    return parse_schema(schema)


def tp_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1).encode())


# ---------------------------------------------------------------------------------------- manifests
def manifest_path(root: Path, topic: str, partition: int) -> Path:
    return Path(root) / MANIFEST_DIR / f"{topic}.p{partition}.json"


def partition_lock(root: Path, topic: str, partition: int) -> Any:
    """Exclusive lock on a partition's manifest and files (across threads and processes)."""
    return file_lock(manifest_path(root, topic, partition).with_suffix(".lock"))


def load_partition(root: Path, topic: str, partition: int) -> dict[str, Any]:
    path = manifest_path(root, topic, partition)
    if not path.exists():
        return {"topic": topic, "partition": partition, "next_offset": 0, "files": []}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the shard manifest {path}: {exc}; it is replaced atomically, so this is "
                        "damage from outside: restore it from a backup") from exc


def save_partition(root: Path, state: dict[str, Any]) -> None:
    state["updated_at"] = time.time()
    path = manifest_path(root, state["topic"], state["partition"])
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, state)


def legacy_scan(root: Path) -> tuple[dict[tuple[str, int], list[dict]], list[Path]]:
    """Files of the per-flush layout: (closed entries of complete flush groups per partition, members
    of incomplete groups, which were never committed)."""
    groups: dict[tuple, list[tuple[Path, dict]]] = defaultdict(list)
    for f in Path(root).glob("*/*.avro"):
        m = LEGACY_NAME.match(f.name)
        if m and f.parent.name != TMP_DIR:
            g = m.groupdict()
            groups[(g["topic"], int(g["part"]), int(g["first"]), int(g["last"]), int(g["n"]))].append((f, g))
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    incomplete: list[Path] = []
    for (topic, part, first, last, n), members in groups.items():
        if len(members) != n:
            incomplete.extend(f for f, _ in members)
            continue
        for f, g in members:
            out[(topic, part)].append({"file": str(f.relative_to(root)), "split": f.parent.name, "first_offset": first,
                                       "last_offset": last, "count": int(g["count"]), "bytes": None, "open": False,
                                       "created_at": f.stat().st_mtime})
    for entries in out.values():
        entries.sort(key=lambda e: (e["split"], e["first_offset"]))
    return out, incomplete


@dataclass
class Manifest:
    """Every partition's manifest at one moment (each read atomically), legacy files included."""

    root: Path
    partitions: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def entries(self, splits: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """File entries (with their topic and partition), by partition, split and offset."""
        wanted = set(splits) if splits is not None else None
        out = []
        for (topic, part), state in sorted(self.partitions.items()):
            for e in sorted(state["files"], key=lambda e: (e["split"], e["first_offset"])):
                if wanted is None or e["split"] in wanted:
                    out.append(e | {"topic": topic, "partition": part})
        return out

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self.entries():
            out[e["split"]] += e["count"]
        return dict(out)

    def positions(self) -> dict[str, int]:
        """Per partition, the offset after the last committed record: what a reader of this manifest saw."""
        return {tp_key(*tp): s["next_offset"] for tp, s in sorted(self.partitions.items())}


def load_manifest(root: Path) -> Manifest:
    root = Path(root)
    man = Manifest(root)
    for path in sorted((root / MANIFEST_DIR).glob("*.json")):
        m = re.match(r"^(?P<topic>.+)\.p(?P<part>\d+)\.json$", path.name)
        if m:
            man.partitions[(m["topic"], int(m["part"]))] = load_partition(root, m["topic"], int(m["part"]))
    legacy, _ = legacy_scan(root)
    for tp, entries in legacy.items():
        state = man.partitions.setdefault(tp, {"topic": tp[0], "partition": tp[1], "next_offset": 0, "files": []})
        named = {e["file"] for e in state["files"]}
        fresh = [e for e in entries if e["file"] not in named]
        state["files"] = state["files"] + fresh
        if fresh:
            state["next_offset"] = max(state["next_offset"], max(e["last_offset"] for e in fresh) + 1)
    return man


def write_summary(root: Path) -> dict[str, Any]:
    """Rewrite ``manifest.json`` (totals per split, every file with its committed count) from the
    partitions' manifests, and return it."""
    man = load_manifest(root)
    summary = {"updated_at": time.time(), "totals": man.totals(), "positions": man.positions(),
               "shards": man.entries()}
    Path(root).mkdir(parents=True, exist_ok=True)
    _write_json_atomic(Path(root) / MANIFEST, summary)
    return summary


def leftovers(root: Path) -> list[Path]:
    """Shard files no manifest names: left by a crash (an append or a compaction that never reached
    its manifest, or files compaction replaced), removed by the partition's next writer or compaction.
    Readers never see them. A file being created under its partition's lock shows here for a moment."""
    root = Path(root)
    man = load_manifest(root)
    named = {e["file"] for e in man.entries()}
    out = [f for f in root.glob("*/*.avro") if f.parent.name != TMP_DIR and str(f.relative_to(root)) not in named
           and (OPEN_NAME.match(f.name) or COMPACT_NAME.match(f.name))]
    return sorted(out + legacy_scan(root)[1])


# ---------------------------------------------------------------------------------------- reading
class _Bounded(io.RawIOBase):
    """The first ``left`` bytes of a file: a reader never sees an append that was not committed."""

    def __init__(self, fh: Any, left: int) -> None:
        self.fh, self.left = fh, left

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        if n <= 0:
            return 0
        data = self.fh.read(n)
        buf[: len(data)] = data
        self.left -= len(data)
        return len(data)


def read_file(root: Path, entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The committed records of one manifest entry, one at a time. A legacy record (no offset)
    gets its file's last offset, which is all a lineage position needs of it."""
    path = Path(root) / entry["file"]
    with path.open("rb") as fh:
        stream = io.BufferedReader(_Bounded(fh, entry["bytes"])) if entry.get("bytes") is not None else fh
        n = 0
        try:
            for rec in avro_reader(stream):
                if n >= entry["count"]:
                    break
                if rec.get("source_offset", -1) < 0:
                    rec["source_offset"] = entry["last_offset"]
                n += 1
                yield rec
        except (ValueError, EOFError) as exc:
            raise DataError(f"cannot read shard {path}: {exc}") from exc
    if n < entry["count"]:
        raise DataError(f"shard {path} holds {n} committed records, its manifest says {entry['count']}: the file "
                        "was changed outside prefstream")


def _replacement(root: Path, entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The records of ``entry`` after compaction replaced its file: from the partition's current
    manifest, the files of its split whose offset range overlaps it, filtered to its range."""
    for _ in range(3):  # a file may be compacted again while we look
        state = load_partition(root, entry["topic"], entry["partition"])
        lo, hi = entry["first_offset"], entry["last_offset"]
        cover = [e for e in state["files"] if e["split"] == entry["split"]
                 and e["first_offset"] <= hi and e["last_offset"] >= lo]
        try:
            out = [r for e in cover for r in read_file(root, e) if lo <= r["source_offset"] <= hi]
        except FileNotFoundError:
            continue
        if len(out) != entry["count"]:
            break
        yield from out
        return
    raise DataError(f"shard {entry['file']} vanished and its records are not where compaction puts them; read the "
                    "shards again (`prefstream shards` shows the manifest)")


def iter_records(root: Path, manifest: Manifest | None = None, splits: Iterable[str] | None = None,
                 entries: list[dict[str, Any]] | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(entry, record) for every committed record, lazily, file by file in manifest order. A file that
    compaction removed meanwhile is read from the file that replaced it."""
    root = Path(root)
    if entries is None:
        entries = (manifest or load_manifest(root)).entries(splits)
    for entry in entries:
        try:
            records = read_file(root, entry)
            first = next(records, None)
        except FileNotFoundError:
            records, first = _replacement(root, entry), None
        if first is not None:
            yield entry, first
        for rec in records:
            yield entry, rec


# ---------------------------------------------------------------------------------------- writing
def _sweep(root: Path, state: dict[str, Any]) -> list[Path]:
    """Remove the partition's files that its manifest does not name (call with the lock held)."""
    named = {e["file"] for e in state["files"]}
    prefix = f"{state['topic']}.p{state['partition']}."
    removed = []
    for f in Path(root).glob(f"*/{prefix}*.avro"):
        if f.parent.name == TMP_DIR or not f.name.startswith(prefix) or str(f.relative_to(root)) in named:
            continue
        m = OPEN_NAME.match(f.name) or COMPACT_NAME.match(f.name)
        if m and m["topic"] == state["topic"] and int(m["part"]) == state["partition"]:
            f.unlink(missing_ok=True)
            removed.append(f)
    for d in {f.parent for f in removed}:
        fsync_dir(d)
    return removed


class PartitionLog:
    """Appends one partition's records to rolling per-split files and commits them to its manifest.

    ``append`` makes the records durable (appended, fsynced) and then replaces the manifest; only
    then may the caller commit the consumer offsets. A file rolls (is closed, and the next record of
    its split starts a new one) at ``roll_records`` records or ``roll_age_s`` seconds after it began.
    """

    def __init__(self, root: Path, topic: str, partition: int, roll_records: int = 10_000,
                 roll_age_s: float = 300.0, clock: Any = time.time) -> None:
        self.root, self.topic, self.partition = Path(root), topic, partition
        self.roll_records, self.roll_age_s = max(1, roll_records), roll_age_s
        self.clock = clock  # wall clock: a file's age must survive a restart
        # When this partition's oldest open file reaches the age threshold, from the last manifest this
        # writer committed (it alone appends to the partition); -inf until one was read. Saves a manifest
        # read per poll in close_aged.
        self._close_due_at = float("-inf")
        self.closed = 0  # files this log closed; a caller compacts only after it changed

    def _committed(self, state: dict[str, Any]) -> None:
        """Save the partition's manifest and note when its oldest open file is due to close."""
        save_partition(self.root, state)
        self._note_due(state)

    def _note_due(self, state: dict[str, Any]) -> None:
        opened = [e["created_at"] for e in state["files"] if e["open"]]
        self._close_due_at = min(opened) + self.roll_age_s if opened else float("inf")

    def lock(self) -> Any:
        return partition_lock(self.root, self.topic, self.partition)

    def load(self) -> dict[str, Any]:
        return load_partition(self.root, self.topic, self.partition)

    def recover(self) -> dict[str, Any]:
        """Before the first append: adopt legacy files, drop uncommitted bytes and leftover files.
        Returns the manifest."""
        with self.lock():
            state = self.load()
            legacy, incomplete = legacy_scan(self.root)
            for f in incomplete:
                m = LEGACY_NAME.match(f.name)
                if m and m["topic"] == self.topic and int(m["part"]) == self.partition:
                    f.unlink(missing_ok=True)  # a flush group that never committed: Kafka redelivers it
            named = {e["file"] for e in state["files"]}
            adopted = [e for e in legacy.get((self.topic, self.partition), []) if e["file"] not in named]
            for e in adopted:
                e["bytes"] = (self.root / e["file"]).stat().st_size
                state["next_offset"] = max(state["next_offset"], e["last_offset"] + 1)
            state["files"] = state["files"] + adopted
            for e in state["files"]:
                path = self.root / e["file"]
                if e["open"] and path.stat().st_size > e["bytes"]:
                    os.truncate(path, e["bytes"])  # an append that crashed before its manifest was replaced
            _sweep(self.root, state)
            self._committed(state)
            return state

    def _due(self, entry: dict[str, Any], now: float) -> bool:
        return entry["count"] >= self.roll_records or now - entry["created_at"] >= self.roll_age_s

    def append(self, rows: list[tuple[int, dict[str, Any]]], next_offset: int) -> dict[str, Any]:
        """Commit ``rows`` ((offset, CuratedPair) in offset order) and the partition position
        ``next_offset``. Rows below the committed position are already in the files and skipped, so a
        retried append never writes a record twice. Returns {split: records written}."""
        written: dict[str, int] = defaultdict(int)
        with self.lock():
            state = self.load()
            rows = [(o, r) for o, r in rows if o >= state["next_offset"]]
            by_split: dict[str, list[tuple[int, dict]]] = defaultdict(list)
            for offset, rec in rows:
                by_split[rec["split"]].append((offset, rec))
            now = self.clock()
            new_dirs = set()
            for split, recs in sorted(by_split.items()):
                while recs:
                    entry = next((e for e in state["files"] if e["split"] == split and e["open"]), None)
                    if entry is not None and self._due(entry, now):
                        entry["open"], entry = False, None
                        self.closed += 1
                    if entry is None:
                        name = f"{self.topic}.p{self.partition}.{recs[0][0]:012d}.avro"
                        entry = {"file": f"{split}/{name}", "split": split, "first_offset": recs[0][0],
                                 "last_offset": recs[0][0], "count": 0, "bytes": 0, "open": True, "created_at": now}
                        (self.root / split).mkdir(parents=True, exist_ok=True)
                        new_dirs.add(self.root / split)
                        state["files"].append(entry)
                    take, recs = recs[: self.roll_records - entry["count"]], recs[self.roll_records - entry["count"]:]
                    self._write(entry, take)
                    written[split] += len(take)
                    if entry["count"] >= self.roll_records:
                        entry["open"] = False
                        self.closed += 1
            for d in new_dirs:
                fsync_dir(d)
            state["next_offset"] = max(state["next_offset"], next_offset)
            self._committed(state)
        return dict(written)

    def _write(self, entry: dict[str, Any], rows: list[tuple[int, dict[str, Any]]]) -> None:
        path = self.root / entry["file"]
        recs = [rec | {"source_offset": offset} for offset, rec in rows]
        if entry["count"] == 0:
            mode = "wb"  # a new file: anything under this name was left by a crash before its commit
        else:
            os.truncate(path, entry["bytes"])  # a failed earlier try may have appended past the commit
            mode = "a+b"
        with path.open(mode) as fh:
            avro_writer(fh, shard_schema(), recs, codec=CODEC)
            fh.flush()
            os.fsync(fh.fileno())
            size = os.fstat(fh.fileno()).st_size
        entry.update(count=entry["count"] + len(recs), bytes=size, last_offset=rows[-1][0])

    def close_aged(self) -> int:
        """Close the open files past the age threshold (no record arrived to roll them). Returns how many."""
        now = self.clock()
        if now < self._close_due_at:  # most polls: nothing open is old enough
            return 0
        with self.lock():
            state = self.load()
            aged = [e for e in state["files"] if e["open"] and now - e["created_at"] >= self.roll_age_s]
            for e in aged:
                e["open"] = False
            self.closed += len(aged)
            if aged:
                self._committed(state)
            else:
                self._note_due(state)
            return len(aged)

    def identities(self, key: Any) -> set:
        """``key(record)`` for every committed record of the partition."""
        state = self.load()
        entries = [e | {"topic": self.topic, "partition": self.partition} for e in state["files"]]
        return {key(rec) for _, rec in iter_records(self.root, entries=entries)}


# ---------------------------------------------------------------------------------------- compaction
@dataclass
class Compacted:
    file: str
    sources: int
    records: int


def _groups(entries: list[dict[str, Any]], target: int, min_files: int) -> list[list[dict[str, Any]]]:
    """Runs of consecutive small closed files of one split, each run at most ``target`` records."""
    groups, run, size = [], [], 0
    for e in entries + [None]:
        small = e is not None and not e["open"] and e["count"] < target
        if small and size + e["count"] <= target:
            run.append(e)
            size += e["count"]
            continue
        if len(run) >= min_files:
            groups.append(run)
        run, size = ([e], e["count"]) if small else ([], 0)
    return groups


def compact_partition(root: Path, topic: str, partition: int, target_records: int = 10_000,
                      min_files: int = 2) -> list[Compacted]:
    """Merge runs of small closed files of each split into files of up to ``target_records``.

    The merged file is written and fsynced under shards/.tmp, renamed into its split and named in
    the manifest in one lock hold, and only then are the old files removed. A crash before the
    manifest is replaced leaves the old files in use (the staged or renamed copy is removed later);
    after it, the old files are leftovers. Readers see the old files or the new one, never both.
    """
    root = Path(root)
    tmp_dir = root / TMP_DIR
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp_dir.glob("*.compact"):
        if time.time() - f.stat().st_mtime > STALE_TMP_S:
            f.unlink(missing_ok=True)
    done: list[Compacted] = []
    with partition_lock(root, topic, partition):
        state = load_partition(root, topic, partition)
        _sweep(root, state)  # what a crashed compaction left behind
    by_split: dict[str, list[dict]] = defaultdict(list)
    for e in sorted(state["files"], key=lambda e: (e["split"], e["first_offset"])):
        by_split[e["split"]].append(e)
    for split, entries in sorted(by_split.items()):
        for group in _groups(entries, target_records, min_files):
            first, last = group[0]["first_offset"], group[-1]["last_offset"]
            name = f"{topic}.p{partition}.{first:012d}-{last:012d}.c.avro"
            staged = tmp_dir / f"{name}.{os.getpid()}.compact"
            src = [e | {"topic": topic, "partition": partition} for e in group]
            count = 0

            def records(src: list[dict[str, Any]] = src) -> Iterator[dict[str, Any]]:
                nonlocal count
                for _, rec in iter_records(root, entries=src):
                    count += 1
                    yield rec

            with staged.open("wb") as fh:
                avro_writer(fh, shard_schema(), records(), codec=CODEC)  # streams: one block per sync interval
                fh.flush()
                os.fsync(fh.fileno())
                size = os.fstat(fh.fileno()).st_size
            if count != sum(e["count"] for e in group):
                staged.unlink(missing_ok=True)
                raise DataError(f"compacting {split} of {topic}[{partition}]: read {count} records from files whose "
                                f"manifest entries hold {sum(e['count'] for e in group)}")
            final = root / split / name
            with partition_lock(root, topic, partition):
                current = load_partition(root, topic, partition)
                names = [e["file"] for e in current["files"]]
                if not all(e["file"] in names and not _entry(current, e["file"])["open"] for e in group):
                    staged.unlink(missing_ok=True)  # another compaction got there first
                    continue
                os.replace(staged, final)
                fsync_dir(final.parent)
                merged = {"file": str(final.relative_to(root)), "split": split, "first_offset": first,
                          "last_offset": last, "count": count, "bytes": size, "open": False,
                          "created_at": group[0]["created_at"]}
                gone = {e["file"] for e in group}
                current["files"] = [e for e in current["files"] if e["file"] not in gone] + [merged]
                save_partition(root, current)
                for e in group:
                    (root / e["file"]).unlink(missing_ok=True)
                fsync_dir(final.parent)
            done.append(Compacted(merged["file"], len(group), count))
    return done


def _entry(state: dict[str, Any], file: str) -> dict[str, Any]:
    return next(e for e in state["files"] if e["file"] == file)


def compact(root: Path, target_records: int = 10_000, min_files: int = 2) -> list[Compacted]:
    """Compact every partition under ``root`` (see ``compact_partition``)."""
    out: list[Compacted] = []
    for topic, part in sorted(load_manifest(root).partitions):
        if manifest_path(root, topic, part).exists():  # legacy files are adopted by a writer first
            out.extend(compact_partition(root, topic, part, target_records, min_files))
    return out
