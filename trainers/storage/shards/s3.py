"""The shard store in object storage (``PREFSTREAM_SHARDS_URL=s3://bucket/prefix``).

Layout under the prefix, the directory store's with every file closed::

    <split>/<topic>.p<partition>.<first>-<last>.<id>.c.avro   one append of the shard writer, or a merge
    manifest/<topic>.p<partition>.json                    the partition's manifest; changed only by CAS

Objects never change once written. Each append uploads one object per split it touches and then
names them in the partition's manifest with a conditional PUT (trainers/storage/s3.py, ``update``),
and only then are the consumer offsets committed: a record is in the bucket before Kafka forgets it,
and a crash at any point leaves either the old manifest (the append is redone from Kafka) or the new
one. The commit checks that the manifest is still the one the append planned against, so two writers
racing for a partition during a rebalance never both add the same records: the loser reads again and
appends only what is missing. An object no manifest names was left by such a race or a crash and is
removed once older than STALE_S.

Readers mirror the bucket into a local directory with the directory layout (``mirror``): each
manifest copied, each file it names downloaded once and checked against the sha256 in its entry
(names are never reused for other bytes, so a cached copy of the right size is the same file).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastavro import writer as avro_writer

from trainers.exceptions import DataError
from trainers.storage.files import sha256_file
from trainers.storage.s3 import S3Backend
from trainers.storage.shards.layout import (
    CODEC,
    MANIFEST_DIR,
    MANIFEST_NAME,
    TMP_DIR,
    Change,
    Manifest,
    empty_partition,
    encode,
    manifest_key,
    save_partition,
    shard_schema,
)

SETTING = "PREFSTREAM_SHARDS_URL"
# An object no manifest names and older than this was left by a crash or a lost race (a live
# append names its objects within seconds of uploading them).
STALE_S = 3600.0
MIRROR_ATTEMPTS = 3


class S3ShardStore:
    """The partitions' manifests and files in a bucket, through one S3Backend; read through a mirror."""

    appendable = False

    def __init__(self, backend: S3Backend, cache_dir: str | os.PathLike | None = None) -> None:
        self.backend = backend
        self.location = backend.location
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    @classmethod
    def from_url(cls, url: str, cache_dir: str | os.PathLike | None = None, endpoint_url: str | None = None,
                 client: Any = None) -> S3ShardStore:
        # The backend's cache directory holds model versions; the shard store never uses it.
        return cls(S3Backend.from_url(url, Path(TMP_DIR), endpoint_url, client=client, setting=SETTING), cache_dir)

    @property
    def local_root(self) -> Path:
        if self.cache_dir is None:
            raise DataError(f"the shards at {self.location} are in object storage and need a local directory to "
                            "mirror them into: set PREFSTREAM_SHARDS_CACHE_DIR (or PREFSTREAM_HOME)")
        return self.cache_dir

    # ------------------------------------------------------------------ manifests
    def load_partition(self, topic: str, partition: int) -> dict[str, Any]:
        raw = self.backend.read(manifest_key(topic, partition))
        if raw is None:
            return empty_partition(topic, partition)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise DataError(f"{self.location}/{manifest_key(topic, partition)} is not JSON ({exc}); it is only "
                            "replaced whole, so this is damage from outside: restore it from a backup") from exc

    def partitions(self) -> list[tuple[str, int]]:
        out = []
        for key, _ in self.backend.list(f"{MANIFEST_DIR}/"):
            m = MANIFEST_NAME.match(key.rpartition("/")[2])
            if m:
                out.append((m["topic"], int(m["part"])))
        return sorted(out)

    def manifest(self) -> Manifest:
        man = Manifest(Path(self.location))
        for topic, part in self.partitions():
            man.partitions[(topic, part)] = self.load_partition(topic, part)
        return man

    def hold(self, topic: str, partition: int) -> Any:
        return contextlib.nullcontext()  # commit() is a compare-and-swap

    def commit(self, topic: str, partition: int, change: Change) -> dict[str, Any]:
        def apply(current: bytes | None) -> bytes:
            state = json.loads(current) if current else empty_partition(topic, partition)
            change(state)
            state["updated_at"] = time.time()
            return json.dumps(state, indent=1).encode()

        return json.loads(self.backend.update(manifest_key(topic, partition), apply))

    def recover(self, topic: str, partition: int) -> dict[str, Any]:
        state = self.load_partition(topic, partition)
        self.sweep(state)
        return state

    # ------------------------------------------------------------------ writing
    def new_file(self, split: str, topic: str, partition: int, first: int, last: int) -> str:
        """A name no other upload uses: two writers racing for one partition upload the same offsets, and an
        Avro file's bytes differ with its random sync marker, so the loser must never overwrite the winner's
        object (its own is left unnamed and swept)."""
        return f"{split}/{topic}.p{partition}.{first:012d}-{last:012d}.{uuid.uuid4().hex[:8]}.c.avro"

    def _put(self, entry: dict[str, Any], data: bytes) -> None:
        self.backend.put(entry["file"], data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def write(self, entry: dict[str, Any], rows: list[tuple[int, dict[str, Any]]]) -> None:
        if entry["count"]:
            raise DataError(f"{self.location}/{entry['file']} is an object and takes no appends")
        self._put(entry, encode(rows))
        entry.update(count=len(rows), last_offset=rows[-1][0])

    def write_merged(self, topic: str, partition: int, entry: dict[str, Any],
                     records: Iterable[dict[str, Any]]) -> None:
        entry["file"] = self.new_file(entry["split"], topic, partition, entry["first_offset"], entry["last_offset"])
        buf = io.BytesIO()
        avro_writer(buf, shard_schema(), records, codec=CODEC)
        self._put(entry, buf.getvalue())

    def place(self, entry: dict[str, Any]) -> None:
        pass  # uploaded under its final name, which no manifest names until the commit

    def discard(self, entry: dict[str, Any]) -> None:
        self.backend.delete(entry["file"])  # a name only this compaction used

    def delete(self, files: Iterable[str]) -> None:
        for f in files:
            self.backend.delete(f)

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
    def local_copy(self, entries: list[dict[str, Any]]) -> Path | None:
        root = self.local_root
        return root if all(self.fetch(root, e) for e in entries) else None

    def readable(self, partitions: list[tuple[str, int]] | None = None) -> Path:
        return self.mirror(self.local_root, partitions)

    def write_summary(self) -> None:
        pass  # a bucket has no summary: its readers mirror the manifests (`prefstream shards` summarises the mirror)

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
