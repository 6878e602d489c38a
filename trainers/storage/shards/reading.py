"""Committed reads of a shards directory: only what a manifest names, only up to its committed length.

Bytes past a file's committed length belong to an append that was never committed: readers stop
there. A file that compaction removed after the reader took its manifest is read from the file that
replaced it, so a reader sees every record once whatever runs beside it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from fastavro import reader as avro_reader

from trainers.exceptions import DataError
from trainers.storage.shards.layout import Manifest, load_manifest, load_partition


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
    """The committed records of one manifest entry, one at a time."""
    path = Path(root) / entry["file"]
    with path.open("rb") as fh:
        stream = io.BufferedReader(_Bounded(fh, entry["bytes"])) if entry.get("bytes") is not None else fh
        n = 0
        try:
            # Shard files hold records of shard_schema(), which fastavro reads as dicts.
            for rec in cast(Iterable[dict[str, Any]], avro_reader(stream)):
                if n >= entry["count"]:
                    break
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
    """(entry, record) for every committed record of a shards directory, lazily, file by file in
    manifest order. A file that compaction removed meanwhile is read from the file that replaced it."""
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
