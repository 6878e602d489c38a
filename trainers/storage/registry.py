"""The model store: one version a directory (or key prefix), published atomically, verified by sha256 on load.

Layout under the store's root, a directory (``PREFSTREAM_MODELS_DIR``) or an S3 prefix
(``PREFSTREAM_MODELS_URL=s3://bucket/prefix``); trainers/storage/files.py and trainers/storage/s3.py keep
the bytes:

    versions/<version>/      config, tokenizer, model.safetensors, *.onnx, metrics.json, manifest.json
                             (the manifest also holds the version's calibration temperature)
    roles/<role>.json        {"history": [oldest, ..., serving], "generation": n, "op": id} for current or gold

A version exists once its manifest does, and the manifest is written after every other file.
Role histories change only through the backend's ``update`` (a file lock, or conditional PUTs), so
two controllers promoting at once both land. Loading goes through ``checkout``: the version's files
on this machine (in place, or downloaded into a cache), each checked against the manifest.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.evaluation.calibration import MANIFEST_KEY, temperature_of
from trainers.exceptions import CorruptArtifactError, RegistryError, UnknownVersionError
from trainers.storage.files import (
    MANIFEST,
    LocalBackend,
    StoreBackend,
    atomic_write,
    fsync_dir,
    open_backend,
    sha256_file,
    verify_dir,
)

__all__ = ["BOOTSTRAP_VERSION", "MANIFEST", "ROLES", "Announcer", "ModelStore", "VersionInfo", "atomic_write",
           "fsync_dir", "open_store", "sha256_file"]

ROLES = ("current", "gold")
BOOTSTRAP_VERSION = "bootstrap"

Announcer = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path  # in the store (directory store) or in this machine's cache (S3); files exist after checkout
    manifest: dict[str, Any]

    @property
    def role(self) -> str:
        return self.manifest.get("role", "")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def temperature(self) -> float:
        """The calibration temperature of the version (1.0 for one published without)."""
        return temperature_of(self.manifest)


def open_store(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
               endpoint_url: str | None = None) -> ModelStore:
    """The model store at ``location``: a directory, or ``s3://bucket/prefix`` with a local ``cache_dir``."""
    return ModelStore(open_backend(location, cache_dir, endpoint_url))


class ModelStore:
    def __init__(self, root: str | os.PathLike | StoreBackend) -> None:
        """A store on ``root``: a directory, or a backend (``open_store`` makes one from a URL)."""
        self.backend: StoreBackend = LocalBackend(root) if isinstance(root, (str, os.PathLike)) else root
        self.location = self.backend.location

    def check(self) -> None:
        """Raise StoreAccessError, saying the fix, when the store cannot be reached."""
        self.backend.check()

    # ------------------------------------------------------------------ publish
    def publish(self, src: str | os.PathLike, role: str, parent: str | None = None,
                lineage: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                promote: bool = True, announce: Announcer | None = None, reason: str = "",
                calibration: dict[str, Any] | None = None) -> VersionInfo:
        """Copy the model directory ``src`` in as a new version; promote it to ``role`` unless told not to.

        ``calibration`` (trainers.evaluation.calibration.Calibration.to_manifest) goes into the manifest: the
        temperature the scorers divide the margin by. A version without one is scored with T = 1.
        """
        self._check_role(role)
        src = Path(src)
        if not (src / "config.json").exists():
            raise RegistryError(f"{src} is not a model directory (no config.json)")
        version = f"{role}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if metrics is None and (src / "metrics.json").exists():
            metrics = json.loads((src / "metrics.json").read_text())
        made: dict[str, Any] = {}

        def make_manifest(directory: Path, files: list[str]) -> bytes:
            made.update({
                "version": version, "role": role, "parent": parent, "created_at": time.time(),
                "files": {rel: {"sha256": sha256_file(directory / rel), "bytes": (directory / rel).stat().st_size}
                          for rel in files},
                "lineage": lineage or {}, "metrics": _headline(metrics or {}),
            } | ({MANIFEST_KEY: calibration} if calibration else {}))
            return json.dumps(made, indent=2).encode()

        self.backend.publish_version(version, src, make_manifest)
        info = VersionInfo(version, self._path(version), made)
        if promote:
            self.promote(version, role, announce=announce, reason=reason or "published")
        return info

    # ------------------------------------------------------------------ read
    def list(self) -> list[VersionInfo]:
        out = [self.get(name) for name in self.backend.version_names()]
        return sorted(out, key=lambda v: v.manifest.get("created_at", 0))

    def _manifest_bytes(self, version: str) -> bytes:
        data = self.backend.read(f"versions/{version}/{MANIFEST}") if _plain_name(version) else None
        if data is None:
            known = ", ".join(self.backend.version_names()) or "none"
            raise UnknownVersionError(f"no model version {version!r} in {self.location} (known: {known})")
        return data

    def get(self, version: str) -> VersionInfo:
        return VersionInfo(version, self._path(version), json.loads(self._manifest_bytes(version)))

    def checkout(self, version: str, manifest_sha256: str | None = None) -> Path:
        """A directory on this machine with the version's files, every one checked against the manifest.

        With ``manifest_sha256`` (an announcement's) the manifest must match it before anything is
        fetched. A local copy that no longer verifies is dropped and fetched once more.
        """
        manifest = self._manifest_bytes(version)
        if manifest_sha256 is not None and hashlib.sha256(manifest).hexdigest() != manifest_sha256:
            raise CorruptArtifactError(f"the manifest of {version} in {self.location} does not match the announced "
                                       "sha256; re-announce the version from the store")
        files = json.loads(manifest)["files"]
        while True:
            path, fresh = self.backend.local_dir(version, manifest)
            try:
                verify_dir(path, version, files)
                return path
            except CorruptArtifactError:
                self.backend.discard(version)
                if fresh:
                    raise

    def verify(self, version: str) -> VersionInfo:
        """Check every file against the manifest; raise CorruptArtifactError on any difference."""
        self.checkout(version)
        return self.get(version)

    def manifest_sha256(self, version: str) -> str:
        return hashlib.sha256(self._manifest_bytes(version)).hexdigest()

    def history(self, role: str) -> builtins.list[str]:
        self._check_role(role)
        data = self.backend.read(_role_key(role))
        return json.loads(data)["history"] if data else []

    def serving(self, role: str) -> str | None:
        hist = self.history(role)
        return hist[-1] if hist else None

    # ------------------------------------------------------------------ promote / rollback
    def promote(self, version: str, role: str, announce: Announcer | None = None, reason: str = "promoted") -> dict[str, Any]:
        """Serve ``version`` for ``role``, the role it was published for (workers refuse any other)."""
        self._check_role(role)
        published_for = self.get(version).role
        if published_for and published_for != role:
            raise RegistryError(f"version {version} was published for role {published_for!r}, not {role!r}; workers "
                                f"serve a version only in its own role: publish the model again for {role}")
        self.verify(version)
        self._change_history(role, lambda hist: [v for v in hist if v != version] + [version])
        return self._announce(version, role, "promote", reason, announce)

    def rollback(self, role: str, announce: Announcer | None = None, reason: str = "rollback") -> dict[str, Any]:
        """Serve the previous version of ``role`` again (the bad one is dropped from the history)."""
        self._check_role(role)
        hist = self.history(role)
        if len(hist) >= 2:
            self.verify(hist[-2])  # before the change: a corrupt predecessor must not become the serving one

        def drop_last(current: list[str]) -> list[str]:
            if len(current) < 2:
                raise RegistryError(f"role {role!r} has {len(current)} version(s) in its history; nothing to roll "
                                    "back to")
            return current[:-1]

        previous = self._change_history(role, drop_last)[-1]
        if previous != (hist[-2] if len(hist) >= 2 else None):
            self.verify(previous)  # another writer changed the history meanwhile
        return self._announce(previous, role, "rollback", reason, announce)

    def _change_history(self, role: str,
                        change: Callable[[builtins.list[str]], builtins.list[str]]) -> builtins.list[str]:
        """Apply ``change`` to the role's history without losing a concurrent writer's change; the new history.

        Each change carries an id: when a conditional write whose answer was lost is retried, the
        change that already landed is recognised instead of being applied twice (a rollback would
        otherwise drop two versions).
        """
        op = uuid.uuid4().hex

        def apply(current: bytes | None) -> bytes:
            state: dict[str, Any] = json.loads(current) if current else {"history": [], "generation": 0}
            if current is not None and state.get("op") == op:
                return current  # our own write landed already
            return json.dumps({"history": change(list(state["history"])),
                               "generation": state.get("generation", 0) + 1, "op": op}).encode()

        return json.loads(self.backend.update(_role_key(role), apply))["history"]

    def version_record(self, version: str, role: str, action: str, reason: str) -> dict[str, Any]:
        """The ModelVersion record (schemas/avsc/ModelVersion.avsc) announcing ``version``.

        ``path`` says where the version is for people reading the topic; workers resolve the version
        name in their own store and never use it.
        """
        info = self.get(version)
        return {
            "role": role, "version": version, "path": self.backend.url(version), "parent": info.manifest.get("parent"),
            "manifest_sha256": self.manifest_sha256(version),
            "metrics": {k: float(v) for k, v in info.metrics.items() if isinstance(v, (int, float))},
            "action": action, "reason": reason, "announced_at": int(time.time() * 1000),
        }

    def _announce(self, version: str, role: str, action: str, reason: str, announce: Announcer | None) -> dict[str, Any]:
        record = self.version_record(version, role, action, reason)
        if announce is not None:
            announce(record)
        return record

    def _path(self, version: str) -> Path:
        return self.backend.local_path(version)

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise RegistryError(f"role {role!r} is not one of {', '.join(ROLES)}")


def _role_key(role: str) -> str:
    return f"roles/{role}.json"


def _plain_name(version: str) -> bool:
    """A name that stays one path segment (never joined into a key or path otherwise)."""
    return bool(version) and "/" not in version and "\\" not in version and version not in (".", "..")


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Numbers worth carrying in the manifest (no nested config)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
