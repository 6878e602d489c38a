"""The shard store in a directory (``PREFSTREAM_SHARDS_DIR``), shared by the workers of one volume.

A file is appended to (one Avro block per append, fsynced) before its manifest is replaced, so bytes
past the committed length belong to an append that was never committed: readers stop at the
committed length and the partition's next writer truncates them away. Each partition has its own
manifest because each partition has one writer at a time, and several writers (one per worker
process) share the directory. Every change of a split directory or a manifest happens under the
partition's flock (``manifest/<topic>.p<partition>.lock``), so a file that no manifest names, seen
under the lock, is left over from a crash and can be removed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastavro import writer as avro_writer

import trainers.storage.shards.layout as layout
from trainers.storage.files import file_lock, fsync_dir
from trainers.storage.shards.layout import (
    CODEC,
    TMP_DIR,
    Change,
    Manifest,
    load_manifest,
    manifest_path,
    shard_schema,
)

OPEN_NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.(?P<first>\d{12})\.avro$")
COMPACT_NAME = re.compile(r"^(?P<topic>.+)\.p(?P<part>\d+)\.(?P<first>\d{12})-(?P<last>\d{12})\.c\.avro$")
# A compaction's staged file older than this was left by a crash (a live one takes seconds).
STALE_TMP_S = 3600.0


class LocalShardStore:
    """The partitions' manifests and files under one directory."""

    appendable = True

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = self.local_root = Path(root)
        self.location = str(root)
        self._staged: dict[str, Path] = {}  # merged file -> where compaction wrote it, until placed

    def partitions(self) -> list[tuple[str, int]]:
        return layout.partitions(self.root)

    def load_partition(self, topic: str, partition: int) -> dict[str, Any]:
        return layout.load_partition(self.root, topic, partition)

    def manifest(self) -> Manifest:
        return load_manifest(self.root)

    def hold(self, topic: str, partition: int) -> Any:
        """Exclusive lock on a partition's manifest and files (across threads and processes)."""
        return file_lock(manifest_path(self.root, topic, partition).with_suffix(".lock"))

    def commit(self, topic: str, partition: int, change: Change) -> dict[str, Any]:
        # Under hold(): nothing else changes the manifest between this read and the save.
        state = self.load_partition(topic, partition)
        change(state)
        layout.save_partition(self.root, state)
        return state

    def recover(self, topic: str, partition: int) -> dict[str, Any]:
        with self.hold(topic, partition):
            state = self.load_partition(topic, partition)
            for e in state["files"]:
                path = self.root / e["file"]
                if e["open"] and path.stat().st_size > e["bytes"]:
                    os.truncate(path, e["bytes"])  # an append that crashed before its manifest was replaced
            self.sweep(state)
            layout.save_partition(self.root, state)
            return state

    def new_file(self, split: str, topic: str, partition: int, first: int, last: int) -> str:
        return f"{split}/{topic}.p{partition}.{first:012d}.avro"

    def write(self, entry: dict[str, Any], rows: list[tuple[int, dict[str, Any]]]) -> None:
        path = self.root / entry["file"]
        recs = [rec | {"source_offset": offset} for offset, rec in rows]
        if entry["count"] == 0:
            mode = "wb"  # a new file: anything under this name was left by a crash before its commit
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            os.truncate(path, entry["bytes"])  # a failed earlier try may have appended past the commit
            mode = "a+b"
        with path.open(mode) as fh:
            avro_writer(fh, shard_schema(), recs, codec=CODEC)
            fh.flush()
            os.fsync(fh.fileno())
            size = os.fstat(fh.fileno()).st_size
        if entry["count"] == 0:
            fsync_dir(path.parent)
        entry.update(count=entry["count"] + len(recs), bytes=size, last_offset=rows[-1][0])

    def write_merged(self, topic: str, partition: int, entry: dict[str, Any],
                     records: Iterable[dict[str, Any]]) -> None:
        """Written and fsynced under shards/.tmp, where neither readers nor sweeps look."""
        entry["file"] = (f"{entry['split']}/{topic}.p{partition}.{entry['first_offset']:012d}-"
                         f"{entry['last_offset']:012d}.c.avro")
        staged = self.root / TMP_DIR / f"{Path(entry['file']).name}.{os.getpid()}.compact"
        staged.parent.mkdir(parents=True, exist_ok=True)
        with staged.open("wb") as fh:
            avro_writer(fh, shard_schema(), records, codec=CODEC)  # streams: one block per sync interval
            fh.flush()
            os.fsync(fh.fileno())
            entry["bytes"] = os.fstat(fh.fileno()).st_size
        self._staged[entry["file"]] = staged

    def place(self, entry: dict[str, Any]) -> None:
        final = self.root / entry["file"]
        os.replace(self._staged.pop(entry["file"]), final)
        fsync_dir(final.parent)

    def discard(self, entry: dict[str, Any]) -> None:
        staged = self._staged.pop(entry["file"], None)
        if staged is not None:
            staged.unlink(missing_ok=True)

    def delete(self, files: Iterable[str]) -> None:
        dirs = set()
        for f in files:
            (self.root / f).unlink(missing_ok=True)
            dirs.add((self.root / f).parent)
        for d in dirs:
            fsync_dir(d)

    def sweep(self, state: dict[str, Any]) -> list[str]:
        """Remove the partition's files that its manifest does not name (call under hold), and staged
        merges a crashed compaction left."""
        for f in (self.root / TMP_DIR).glob("*.compact"):
            if time.time() - f.stat().st_mtime > STALE_TMP_S:
                f.unlink(missing_ok=True)
        named = {e["file"] for e in state["files"]}
        prefix = f"{state['topic']}.p{state['partition']}."
        removed = []
        for f in self.root.glob(f"*/{prefix}*.avro"):
            rel = str(f.relative_to(self.root))
            if f.parent.name == TMP_DIR or rel in named:
                continue
            m = OPEN_NAME.match(f.name) or COMPACT_NAME.match(f.name)
            if m and m["topic"] == state["topic"] and int(m["part"]) == state["partition"]:
                f.unlink(missing_ok=True)
                removed.append(rel)
        for d in {(self.root / f).parent for f in removed}:
            fsync_dir(d)
        return removed

    def local_copy(self, entries: list[dict[str, Any]]) -> Path | None:
        return self.root

    def readable(self, partitions: list[tuple[str, int]] | None = None) -> Path:
        return self.root

    def write_summary(self) -> None:
        layout.write_summary(self.root)


def leftovers(root: Path) -> list[Path]:
    """Shard files no manifest names: left by a crash (an append or a compaction that never reached
    its manifest, or files compaction replaced), removed by the partition's next writer or compaction.
    Readers never see them. A file being created under its partition's lock shows here for a moment."""
    root = Path(root)
    named = {e["file"] for e in load_manifest(root).entries()}
    return sorted(f for f in root.glob("*/*.avro") if f.parent.name != TMP_DIR
                  and str(f.relative_to(root)) not in named and (OPEN_NAME.match(f.name) or COMPACT_NAME.match(f.name)))
