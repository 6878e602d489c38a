"""One memory cgroup per sandbox run, where the kernel lets this process make one.

A run forks: a per-process address-space limit alone lets N processes take N times the limit. A
cgroup caps what all the run's processes hold together; past it the kernel's OOM killer kills one of
them (the run then fails with status "memory limit"). This module finds where it can create such
cgroups: under its own cgroup in a cgroup v2 hierarchy whose ``cgroup.subtree_control`` already
enables the memory controller (this process never moves itself to make that possible), else under its
own cgroup in a cgroup v1 memory hierarchy. Where neither is writable (a container's read-only
/sys/fs/cgroup, a non-root worker without a delegated cgroup), :func:`find` returns None and the
sandbox divides its memory cap between its processes instead (sandbox.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass

RUN_PREFIX = "prefstream-run-"
# A run's processes are gone when bwrap is (its PID namespace dies with it); rmdir of the cgroup may
# still see them for a moment while the kernel tears them down.
RMDIR_WAIT_S = 2.0


@dataclass(frozen=True)
class Hierarchy:
    """Where this process creates run cgroups, and the file names of that cgroup version."""

    version: int  # 1 or 2
    parent: str  # this process's own cgroup directory

    @property
    def mode(self) -> str:
        return f"cgroup_v{self.version}"

    def create(self, limit_bytes: int) -> RunCgroup:
        """A new cgroup capped at ``limit_bytes`` of memory (swap included where the kernel accounts it)."""
        path = os.path.join(self.parent, f"{RUN_PREFIX}{uuid.uuid4().hex}")
        os.mkdir(path)
        try:
            if self.version == 2:
                _write(path, "memory.max", str(limit_bytes))
                _write_if_present(path, "memory.swap.max", "0")
            else:
                _write(path, "memory.limit_in_bytes", str(limit_bytes))
                # memsw is memory plus swap; it must be set after (and not below) the memory limit.
                _write_if_present(path, "memory.memsw.limit_in_bytes", str(limit_bytes))
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise
        return RunCgroup(self.version, path)

    def remove_stale(self) -> None:
        """Remove run cgroups a killed process left behind (empty ones only: rmdir refuses the others)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.parent):
                if name.startswith(RUN_PREFIX):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(self.parent, name))


@dataclass
class RunCgroup:
    version: int
    path: str

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into this cgroup (its children are born there).
        The shell exports PWD; ``env -i`` hands ``argv`` the empty environment the sandbox starts from."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec /usr/bin/env -i "$@"', os.path.join(self.path, "cgroup.procs"),
                *argv]

    def close(self) -> tuple[bool, int | None]:
        """Kill what is left in the cgroup, remove it; (whether the OOM killer killed a process, peak bytes)."""
        oom = _counter(self.path, "memory.events" if self.version == 2 else "memory.oom_control", "oom_kill") > 0
        peak = _read_int(self.path, "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        end = time.monotonic() + RMDIR_WAIT_S
        while True:
            self._kill_all()
            try:
                os.rmdir(self.path)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > end:
                    break  # left for Hierarchy.remove_stale; the processes in it are being killed
                time.sleep(0.02)
        return oom, peak

    def _kill_all(self) -> None:
        if self.version == 2 and os.path.exists(os.path.join(self.path, "cgroup.kill")):
            with contextlib.suppress(OSError):
                _write(self.path, "cgroup.kill", "1")
            return
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as fh:
                pids = [int(p) for p in fh.read().split()]
        except OSError:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _write(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "w") as fh:
        fh.write(value)


def _write_if_present(path: str, name: str, value: str) -> None:
    if os.path.exists(os.path.join(path, name)):
        _write(path, name, value)


def _read_int(path: str, name: str) -> int | None:
    try:
        with open(os.path.join(path, name)) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _counter(path: str, name: str, key: str) -> int:
    """``key``'s value in a flat-keyed cgroup file (``memory.events``, ``memory.oom_control``); 0 if absent."""
    try:
        with open(os.path.join(path, name)) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0


def _own_cgroups() -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in the v1 memory hierarchy (None where absent)."""
    v2 = v1 = None
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                hid, controllers, path = line.rstrip("\n").split(":", 2)
                if hid == "0" and controllers == "":
                    v2 = path
                elif "memory" in controllers.split(","):
                    v1 = path
    except (OSError, ValueError):
        pass
    return v2, v1


def _mounts() -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(root, mount point) of the cgroup2 mount and of the v1 memory mount, from /proc/self/mountinfo."""
    v2 = v1 = None
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, after = left.split(), right.split()
                if len(fields) < 5 or len(after) < 3:
                    continue
                if after[0] == "cgroup2" and v2 is None:
                    v2 = (fields[3], fields[4])
                elif after[0] == "cgroup" and "memory" in after[2].split(",") and v1 is None:
                    v1 = (fields[3], fields[4])
    except OSError:
        pass
    return v2, v1


def _directory(mount: tuple[str, str] | None, path: str | None) -> str | None:
    if mount is None or path is None:
        return None
    root, point = mount
    if root != "/" and not (path == root or path.startswith(root.rstrip("/") + "/")):
        return None  # our cgroup is outside what this mount shows
    relative = path[len(root.rstrip("/")):] if root != "/" else path
    return os.path.normpath(point + "/" + relative.lstrip("/"))


def _usable(hierarchy: Hierarchy) -> bool:
    try:
        hierarchy.create(64 << 20).close()
        return True
    except OSError:
        return False


def find() -> Hierarchy | None:
    """Where run cgroups can be made here, tried by creating and removing one; None where nowhere."""
    own_v2, own_v1 = _own_cgroups()
    mount_v2, mount_v1 = _mounts()
    v2 = _directory(mount_v2, own_v2)
    if v2 is not None:
        try:
            with open(os.path.join(v2, "cgroup.subtree_control")) as fh:
                delegated = "memory" in fh.read().split()
        except OSError:
            delegated = False
        if delegated and _usable(Hierarchy(2, v2)):
            Hierarchy(2, v2).remove_stale()
            return Hierarchy(2, v2)
    v1 = _directory(mount_v1, own_v1)
    if v1 is not None and _usable(Hierarchy(1, v1)):
        Hierarchy(1, v1).remove_stale()
        return Hierarchy(1, v1)
    return None
