"""The model store: one directory a version, published atomically, verified by sha256 on load.

Layout under the store root (a local directory, or a PVC mounted in Kubernetes):

    versions/<version>/      config, tokenizer, model.safetensors, *.onnx, metrics.json, manifest.json
    roles/<role>.json        {"history": [oldest, ..., serving]} for role current or gold
    .tmp/                    versions being written; never listed

Publishing copies into .tmp/, fsyncs every file and the directory, then renames into versions/:
a crash leaves a stray temporary directory, never a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.exceptions import CorruptArtifactError, RegistryError

MANIFEST = "manifest.json"
ROLES = ("current", "gold")
BOOTSTRAP_VERSION = "bootstrap"
CHUNK = 1 << 20

Announcer = Callable[[dict[str, Any]], None]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def role(self) -> str:
        return self.manifest.get("role", "")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


class ModelStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.roles_dir = self.root / "roles"
        self.tmp_dir = self.root / ".tmp"

    # ------------------------------------------------------------------ publish
    def publish(self, src: str | os.PathLike, role: str, parent: str | None = None,
                lineage: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                promote: bool = True, announce: Announcer | None = None, reason: str = "") -> VersionInfo:
        """Copy the model directory ``src`` in as a new version; promote it to ``role`` unless told not to."""
        self._check_role(role)
        src = Path(src)
        if not (src / "config.json").exists():
            raise RegistryError(f"{src} is not a model directory (no config.json)")
        for d in (self.versions_dir, self.roles_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        version = f"{role}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        staging = self.tmp_dir / version
        shutil.copytree(src, staging, ignore=shutil.ignore_patterns(MANIFEST, ".*"))
        files = {}
        for f in sorted(p for p in staging.rglob("*") if p.is_file()):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(staging))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        if metrics is None and (staging / "metrics.json").exists():
            metrics = json.loads((staging / "metrics.json").read_text())
        manifest = {
            "version": version, "role": role, "parent": parent, "created_at": time.time(),
            "files": files, "lineage": lineage or {}, "metrics": _headline(metrics or {}),
        }
        _atomic_write(staging / MANIFEST, json.dumps(manifest, indent=2))
        fsync_dir(staging)
        os.rename(staging, self.versions_dir / version)  # atomic: the version appears whole or not at all
        fsync_dir(self.versions_dir)
        info = VersionInfo(version, self.versions_dir / version, manifest)
        if promote:
            self.promote(version, role, announce=announce, reason=reason or "published")
        return info

    # ------------------------------------------------------------------ read
    def list(self) -> list[VersionInfo]:
        if not self.versions_dir.exists():
            return []
        out = []
        for d in sorted(self.versions_dir.iterdir()):
            mf = d / MANIFEST
            if d.is_dir() and mf.exists():
                out.append(VersionInfo(d.name, d, json.loads(mf.read_text())))
        return sorted(out, key=lambda v: v.manifest.get("created_at", 0))

    def get(self, version: str) -> VersionInfo:
        mf = self.versions_dir / version / MANIFEST
        if not mf.exists():
            known = ", ".join(v.version for v in self.list()) or "none"
            raise RegistryError(f"no model version {version!r} in {self.root} (known: {known})")
        return VersionInfo(version, mf.parent, json.loads(mf.read_text()))

    def verify(self, version: str) -> VersionInfo:
        """Check every file against the manifest; raise CorruptArtifactError on any difference."""
        info = self.get(version)
        for rel, meta in info.manifest["files"].items():
            f = info.path / rel
            if not f.exists():
                raise CorruptArtifactError(f"{version}: {rel} is missing; re-publish the version")
            if sha256_file(f) != meta["sha256"]:
                raise CorruptArtifactError(f"{version}: {rel} does not match its sha256 in the manifest; the file is corrupt")
        return info

    def manifest_sha256(self, version: str) -> str:
        return sha256_file(self.get(version).path / MANIFEST)

    def history(self, role: str) -> list[str]:
        self._check_role(role)
        f = self.roles_dir / f"{role}.json"
        return json.loads(f.read_text())["history"] if f.exists() else []

    def serving(self, role: str) -> str | None:
        hist = self.history(role)
        return hist[-1] if hist else None

    # ------------------------------------------------------------------ promote / rollback
    def promote(self, version: str, role: str, announce: Announcer | None = None, reason: str = "promoted") -> dict[str, Any]:
        self._check_role(role)
        self.verify(version)
        self.roles_dir.mkdir(parents=True, exist_ok=True)
        hist = [v for v in self.history(role) if v != version] + [version]
        _atomic_write(self.roles_dir / f"{role}.json", json.dumps({"history": hist}))
        return self._announce(version, role, "promote", reason, announce)

    def rollback(self, role: str, announce: Announcer | None = None, reason: str = "rollback") -> dict[str, Any]:
        """Serve the previous version of ``role`` again (the bad one is dropped from the history)."""
        hist = self.history(role)
        if len(hist) < 2:
            raise RegistryError(f"role {role!r} has {len(hist)} version(s) in its history; nothing to roll back to")
        previous = hist[-2]
        self.verify(previous)
        _atomic_write(self.roles_dir / f"{role}.json", json.dumps({"history": hist[:-1]}))
        return self._announce(previous, role, "rollback", reason, announce)

    def version_record(self, version: str, role: str, action: str, reason: str) -> dict[str, Any]:
        """The ModelVersion record (schemas/avsc/ModelVersion.avsc) announcing ``version``."""
        info = self.get(version)
        return {
            "role": role, "version": version, "path": str(info.path.resolve()), "parent": info.manifest.get("parent"),
            "manifest_sha256": self.manifest_sha256(version),
            "metrics": {k: float(v) for k, v in info.metrics.items() if isinstance(v, (int, float))},
            "action": action, "reason": reason, "announced_at": int(time.time() * 1000),
        }

    def _announce(self, version: str, role: str, action: str, reason: str, announce: Announcer | None) -> dict[str, Any]:
        record = self.version_record(version, role, action, reason)
        if announce is not None:
            announce(record)
        return record

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise RegistryError(f"role {role!r} is not one of {', '.join(ROLES)}")


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Numbers worth carrying in the manifest (no nested config)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
