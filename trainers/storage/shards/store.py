"""The ``ShardStore`` interface and the one factory that picks its implementation from a location.

A store holds each partition's manifest and the files it names. ``PartitionLog`` (appends),
``compact_partition`` and the readers are written once against this interface; the two
implementations differ only in how a file lands and how a manifest changes atomically:

- ``LocalShardStore`` (trainers/storage/shards/local.py): a directory. Files stay open for appends
  (one fsynced Avro block each); every change of a partition happens under its flock (``hold``), so a
  file no manifest names, seen under the lock, is a leftover of a crash.
- ``S3ShardStore`` (trainers/storage/shards/s3.py): a bucket. Objects never change once written;
  a manifest changes by compare-and-swap (``commit``), so ``hold`` holds nothing, and readers read a
  local mirror of the bucket.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from trainers.exceptions import DataError, TrainerError
from trainers.storage.shards.layout import Change, Manifest


class ManifestMoved(TrainerError):
    """The partition's manifest changed since it was read (another writer or compaction): read again and
    redo. Caught inside the shard store's callers; never reaches a user."""


class ShardStore(Protocol):
    location: str
    # Whether a file stays open for later appends (a directory) or every write is a closed object (a bucket).
    appendable: bool

    @property
    def local_root(self) -> Path:
        """The local directory the shards are read through: the store's own directory, or a bucket's mirror."""

    def partitions(self) -> list[tuple[str, int]]:
        """(topic, partition) of every partition with a manifest."""

    def load_partition(self, topic: str, partition: int) -> dict[str, Any]:
        """The partition's manifest (an empty one when it has none yet)."""

    def manifest(self) -> Manifest:
        """Every partition's manifest; enough for totals and positions without reading a file."""

    def hold(self, topic: str, partition: int) -> AbstractContextManager[Any]:
        """Exclusive hold on the partition for one load-write-commit (a no-op where ``commit`` is a CAS)."""

    def commit(self, topic: str, partition: int, change: Change) -> dict[str, Any]:
        """Apply ``change`` to the partition's current manifest atomically and return the new one."""

    def recover(self, topic: str, partition: int) -> dict[str, Any]:
        """Before a writer's first append: drop what crashed appends left. Returns the manifest."""

    def new_file(self, split: str, topic: str, partition: int, first: int, last: int) -> str:
        """The name of a new file for the records at offsets ``first``..``last`` of ``split``."""

    def write(self, entry: dict[str, Any], rows: list[tuple[int, dict[str, Any]]]) -> None:
        """Write ``rows`` ((offset, CuratedPair)) durably to ``entry``'s file, after the records it has
        committed, and update the entry's count, bytes and last offset."""

    def write_merged(self, topic: str, partition: int, entry: dict[str, Any],
                     records: Iterable[dict[str, Any]]) -> None:
        """Write the merged file of a compaction where no reader looks yet; set the entry's file and bytes."""

    def place(self, entry: dict[str, Any]) -> None:
        """Put a merged file where its manifest entry will name it (under ``hold``, before ``commit``)."""

    def discard(self, entry: dict[str, Any]) -> None:
        """Remove a merged file that no manifest will name."""

    def delete(self, files: Iterable[str]) -> None:
        """Remove files the partition's manifest no longer names."""

    def sweep(self, state: dict[str, Any]) -> list[str]:
        """Remove the partition's files its manifest does not name, where that is safe. Returns them."""

    def local_copy(self, entries: list[dict[str, Any]]) -> Path | None:
        """A local shards directory holding the files of ``entries``; None when one is gone."""

    def readable(self, partitions: list[tuple[str, int]] | None = None) -> Path:
        """A local shards directory with the committed files of ``partitions`` (all by default)."""

    def write_summary(self) -> None:
        """Refresh the summary readers of the store read (``manifest.json``), where it keeps one."""


def open_shard_store(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     endpoint_url: str | None = None, client: Any = None) -> ShardStore:
    """The shard store at ``location``: ``s3://bucket/prefix`` (read through a mirror in ``cache_dir``)
    or a directory."""
    text = str(location)
    if text.startswith("s3://"):
        from trainers.storage.shards.s3 import S3ShardStore

        return S3ShardStore.from_url(text, cache_dir, endpoint_url, client=client)
    if "://" in text:
        raise DataError(f"shards location {text!r}: only s3://bucket/prefix URLs and directories are supported; "
                        "set PREFSTREAM_SHARDS_URL or PREFSTREAM_SHARDS_DIR to one")
    from trainers.storage.shards.local import LocalShardStore

    return LocalShardStore(text)


def as_store(store: ShardStore | str | os.PathLike) -> ShardStore:
    """A store, or the store at a location (a directory, as tests and offline tools hand in)."""
    return open_shard_store(store) if isinstance(store, (str, os.PathLike)) else store


def readable_root(location: str | os.PathLike, cache_dir: str | os.PathLike | None,
                  endpoint_url: str | None = None) -> Path:
    """A local directory to read the shards at ``location`` from: the directory itself, or for an
    s3:// URL a mirror of it in ``cache_dir`` (brought up to date now)."""
    return open_shard_store(location, cache_dir, endpoint_url).readable()
