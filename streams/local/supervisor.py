"""Runs the services of one prefstream deployment as child processes (for `up` and `demo`).

Each child is `python -m streams.cli <command>` in its own process group, so that

- Ctrl-C in the terminal reaches only the supervisor, which then stops the children in reverse
  start order (annotators and review app before the workers, workers before the stack), and
- stopping a child's group also stops what it started (the controller's local retrain jobs).

A child that does not stop within the grace period is killed; nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from streams.exceptions import StreamsError

STOP_GRACE_S = 30.0


class SupervisorError(StreamsError):
    """A service did not start or died; the message names it and ends with its log."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    ready_url: str | None = None
    expected_exit: bool = False  # one-shot commands (the simulated annotators) may end on their own

    def tail(self, chars: int = 2500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Supervisor:
    env: dict[str, str]
    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: list[str], *, env: dict[str, str] | None = None, ready_url: str | None = None,
              expected_exit: bool = False) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", *args], env=self.env | (env or {}),
                                stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        child = Child(name, proc, log, ready_url, expected_exit)
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, timeout: float = 180) -> None:
        """Until the child's ready URL answers 200; a child that exits first is an error with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise SupervisorError(f"{child.name} exited with code {child.proc.returncode} while starting; "
                                      f"its log ({child.log}) ends:\n{child.tail()}")
            if child.ready_url is None:
                return
            if http_ok(child.ready_url):
                return
            time.sleep(0.3)
        raise SupervisorError(f"{child.name} was not ready after {timeout:.0f} s; its log ({child.log}) ends:\n{child.tail()}")

    def dead(self) -> list[Child]:
        """Children that exited although they should still run."""
        return [c for c in self.children if not c.expected_exit and c.proc.poll() is not None]

    def stop(self, child: Child, grace: float = STOP_GRACE_S) -> int | None:
        if child.proc.poll() is None:
            _signal_group(child.proc.pid, signal.SIGTERM)
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group may hold grandchildren (a retrain job) even after the child itself exited.
        _signal_group(child.proc.pid, signal.SIGKILL)
        if child.proc.poll() is None:
            child.proc.wait(10)
        return child.proc.returncode

    def stop_all(self, grace: float = STOP_GRACE_S) -> dict[str, int | None]:
        codes = {}
        for child in reversed(self.children):
            codes[child.name] = self.stop(child, grace)
        return codes

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def describe_exit(code: int | None) -> str:
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean stop too.
    return "stopped cleanly" if code in (0, -15) else f"exit {code}"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False
