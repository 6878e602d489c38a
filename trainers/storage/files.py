"""Where a model store keeps its bytes: the backend interface, and the local-directory backend.

A backend holds small objects under keys (``roles/current.json``, ``versions/<v>/manifest.json``)
and whole versions. It makes three promises, whatever it stores on:

- a version appears whole or not at all: readers see a version only once its manifest exists,
  and the manifest is written after every other file;
- ``local_dir`` gives a directory on this machine with the version's files (the store's own
  directory, or a download into a cache), which the ModelStore verifies against the manifest
  before anything loads from it;
- ``update`` is a read-modify-write of one small object that never loses a concurrent writer's
  update (a file lock here; conditional PUTs on S3, trainers/storage/s3.py).

``open_backend`` picks the backend from the location: ``s3://bucket/prefix`` or a directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from trainers.exceptions import CorruptArtifactError, RegistryError, UnknownVersionError

MANIFEST = "manifest.json"
CHUNK = 1 << 20

# Builds the manifest for the files of a version directory (called by the backend on the copy it
# will publish, so the sha256s are of the bytes that are stored).
ManifestMaker = Callable[[Path, list[str]], bytes]
# The new content of a small object from its current one (None: the object does not exist yet).
Change = Callable[[bytes | None], bytes]


class StoreBackend(Protocol):
    location: str  # shown in messages and announcements: a directory or s3://bucket/prefix

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such key."""

    def version_names(self) -> list[str]:
        """Names of the complete versions (those with a manifest)."""

    def publish_version(self, version: str, src: Path, make_manifest: ManifestMaker) -> None:
        """Store every file of ``src`` (version_files) as ``version``, the manifest last."""

    def local_dir(self, version: str, manifest: bytes) -> tuple[Path, bool]:
        """A directory on this machine holding the version's files (not yet verified), and whether
        it was written just now (False: a copy made earlier, worth fetching again if it is corrupt)."""

    def local_path(self, version: str) -> Path:
        """Where ``local_dir`` finds or puts the version on this machine."""

    def discard(self, version: str) -> None:
        """Forget a local copy that failed verification (nothing to do where the files are the store's)."""

    def check(self) -> None:
        """Raise, saying the fix, when the store cannot be reached (services call it at start)."""

    def update(self, key: str, change: Change) -> bytes:
        """Replace the object at ``key`` with ``change(current)`` without losing a concurrent update."""

    def url(self, version: str) -> str:
        """Where the version lives, for people reading an announcement (never trusted by workers)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so a create, rename or unlink inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename: readers see old or new."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing), across threads and processes of one host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def version_files(src: Path) -> list[str]:
    """The files of a model directory that make up a version: all but dotfiles and an old manifest."""
    out = []
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        if rel.name == MANIFEST or any(part.startswith(".") for part in rel.parts):
            continue
        out.append(rel.as_posix())
    return out


def verify_dir(path: Path, version: str, files: dict[str, dict]) -> None:
    """Check every file of ``files`` (the manifest's) in ``path``; CorruptArtifactError on any difference."""
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CorruptArtifactError(f"{version}: {rel} is missing; re-publish the version")
        if sha256_file(f) != meta["sha256"]:
            raise CorruptArtifactError(f"{version}: {rel} does not match its sha256 in the manifest; the file "
                                       "is corrupt or was changed after publishing: re-publish the version")


class LocalBackend:
    """A directory (a local disk, or a volume every pod mounts at the same path).

    Layout: ``versions/<version>/`` (files and manifest.json), ``roles/<role>.json``, ``.tmp/``
    (versions being written; never listed). A version is copied into .tmp/, every file and the
    directory fsynced, then renamed into versions/: a crash leaves a stray temporary directory,
    never a half-written version.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.versions_dir = self.root / "versions"
        self.tmp_dir = self.root / ".tmp"

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def version_names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(d.name for d in self.versions_dir.iterdir() if (d / MANIFEST).is_file())

    def publish_version(self, version: str, src: Path, make_manifest: ManifestMaker) -> None:
        for d in (self.versions_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        staging = self.tmp_dir / version
        files = version_files(src)
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, staging / rel)
            with (staging / rel).open("rb") as fh:
                os.fsync(fh.fileno())
        atomic_write(staging / MANIFEST, make_manifest(staging, files))
        fsync_dir(staging)
        os.rename(staging, self.versions_dir / version)  # atomic: the version appears whole or not at all
        fsync_dir(self.versions_dir)

    def version_path(self, version: str) -> Path:
        """``versions/<version>`` inside this store, refused when it is missing or a link out of the store."""
        root = self.root.resolve()
        path = self.versions_dir / version
        if not path.is_dir():
            raise UnknownVersionError(f"no model version {version!r} in {self.location}")
        if not path.resolve().is_relative_to(root):
            raise UnknownVersionError(f"{path} is a link out of the model store {root}; re-publish the version "
                                      "into the store")
        return path

    def local_dir(self, version: str, manifest: bytes) -> tuple[Path, bool]:
        return self.version_path(version), True

    def local_path(self, version: str) -> Path:
        return self.versions_dir / version

    def discard(self, version: str) -> None:
        pass  # the store's own files: a corrupt one stays refused until the version is re-published

    def check(self) -> None:
        pass  # a directory is created on first publish; reading a missing one shows an empty store

    def update(self, key: str, change: Change) -> bytes:
        # An exclusive lock on a lock file beside the object (the object itself is replaced by a rename,
        # so locking it would lock an inode that the next writer no longer opens). flock holds between
        # processes on one host; on a network volume it holds only where the file system supports it.
        path = self.root / key
        with file_lock(path.parent / f".{path.name}.lock"):
            new = change(path.read_bytes() if path.exists() else None)
            atomic_write(path, new)
            return new

    def url(self, version: str) -> str:
        return str((self.versions_dir / version).resolve())


def open_backend(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 endpoint_url: str | None = None) -> StoreBackend:
    """The backend for ``location``: ``s3://bucket/prefix`` (downloads go to ``cache_dir``) or a directory."""
    text = str(location)
    if text.startswith("s3://"):
        from trainers.storage.s3 import S3Backend

        if cache_dir is None:
            raise RegistryError(f"the model store {text} is in object storage and needs a local cache directory for "
                                "downloaded versions: set PREFSTREAM_MODELS_CACHE_DIR (or PREFSTREAM_HOME)")
        return S3Backend.from_url(text, Path(cache_dir), endpoint_url=endpoint_url)
    if "://" in text:
        raise RegistryError(f"model store location {text!r}: only s3://bucket/prefix URLs and directories are "
                            "supported")
    return LocalBackend(text)
