"""One background server process with a pid file and a log file under the state directory.

The process is started in its own session so it outlives the CLI that started it
(`prefstream stack up` returns while the servers keep running) and is not hit by the terminal's
Ctrl-C. Its pid file is the record that it is ours: stop() checks the command line before it
signals, so a recycled pid is never killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from streams.exceptions import PortInUseError, StackError

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 15
# A killed multi-threaded server (Tansu, weed) shows as gone (a zombie) while its other threads still
# hold its sockets for a moment; a restart waits this long for its ports before calling them taken.
PORT_RELEASE_S = 5.0


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_frees(host: str, port: int, within_s: float = PORT_RELEASE_S) -> bool:
    """Whether ``port`` is free now or becomes free within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while not port_is_free(host, port):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@dataclass
class ServerProcess:
    name: str  # 'broker', 'redis' or 'objectstore': names the pid and log files
    home: Path
    host: str
    port: int
    marker: str  # a word that must appear in the process's command line (binary name)
    port_setting: str = ""  # the setting that chooses the port, named when the port is taken
    stop_timeout_s: float = STOP_TIMEOUT_S  # after SIGTERM, how long to wait before SIGKILL

    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid of our running server, or None (no pid file, dead, or pid reused by another program)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        if _is_zombie(pid) or self.marker not in _cmdline(pid):
            return None
        return pid

    def command_line(self) -> str:
        """The running server's command line ('' when it does not run)."""
        pid = self.pid()
        return _cmdline(pid) if pid is not None else ""

    def log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"

    def start(self, argv: Sequence[str], ready: Callable[[], bool], env: dict[str, str] | None = None) -> int:
        """Start the server unless ours already runs; wait until ``ready()``. Returns the pid."""
        if (pid := self.pid()) is not None:
            return pid
        if not port_frees(self.host, self.port):
            raise PortInUseError(
                f"{self.name}: port {self.port} on {self.host} is in use by another process. Stop that "
                f"process (`ss -ltnp 'sport = :{self.port}'` shows it) or choose another port with "
                f"{self.port_setting or 'its PREFSTREAM_* setting'}."
            )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=self.home,
            )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise StackError(
                    f"{self.name} exited at start with code {proc.returncode}. Last lines of "
                    f"{self.log_file}:\n{self.log_tail()}"
                )
            if ready():
                return proc.pid
            time.sleep(0.1)
        self.stop()
        raise StackError(
            f"{self.name} did not answer on {self.host}:{self.port} within {START_TIMEOUT_S:.0f} s; "
            f"see {self.log_file}:\n{self.log_tail()}"
        )

    def stop(self) -> bool:
        """Stop our server if it runs (TERM, then KILL). Safe when it already died. True if one was stopped."""
        pid = self.pid()
        stopped = False
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            while time.monotonic() < deadline and self.pid() is not None:
                time.sleep(0.05)
            if self.pid() is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while self.pid() is not None:
                    time.sleep(0.05)
            stopped = True
        self.pid_file.unlink(missing_ok=True)
        return stopped
