"""Run untrusted Python (the code verifier's candidates and tests) inside a bubblewrap sandbox.

Each run is a fresh ``bwrap`` sandbox:

- an empty environment: bwrap itself starts with ``env={}`` (without a PID namespace of its own init,
  ``/proc/1/environ`` inside would show bwrap's environment, i.e. the worker's) and ``--clearenv``;
- every namespace unshared (``--unshare-all --unshare-user``): no network (a loopback of its own
  only), its own PID namespace, and no further user namespaces inside (``--disable-userns``);
- a read-only view of /usr (and the /lib, /lib64, /bin, /sbin links) and of the Python install
  that runs the code, a new /proc and /dev, a small private tmpfs at /tmp holding the candidate
  file, the root and /dev remounted read-only: nothing outside /tmp is writable, nothing of the
  worker's files is visible;
- ``--die-with-parent`` and ``--new-session``: when bwrap is killed the PID namespace dies with all
  its processes, grandchildren included;
- rlimits set inside the sandbox by ``prlimit`` (processes, address space, CPU time, file size,
  open files, no core dumps). RLIMIT_NPROC is not enforced for root, so a root worker drops to
  ``SANDBOX_UID`` with ``setpriv`` before bwrap; set inside the sandbox's own user namespace the
  process limit counts that sandbox's processes only, so a fork bomb in one run does not starve
  another;
- a wall-clock timeout and an output bound enforced here: stdout and stderr come through one pipe
  read at most ``Limits.output_bytes``; past it, or past the timeout, the sandbox is killed.

In Kubernetes the sandbox can run in a sidecar (``k8s/components/code-verifier``): that container
alone may create user namespaces, and runs ``python -m streams.runtime.processors.sandbox serve``
on a Unix socket in a volume shared with the worker. A worker that sees the socket's directory
(``SIDECAR_SOCKET``) sends each run there instead of starting bwrap itself.

If no sandbox works on this machine (no bwrap, user namespaces off, no usable interpreter), the
first call to :func:`available` says so once in the log and in ``prefstream_code_sandbox_available``,
and :func:`run_python` never runs the code.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields

log = logging.getLogger(__name__)

BWRAP = shutil.which("bwrap") or "/usr/bin/bwrap"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"  # the path inside the sandbox (/usr is bound read-only)
SANDBOX_UID = 65534  # nobody: what a root worker drops to before bwrap
CANDIDATE = "/tmp/candidate.py"
SIDECAR_SOCKET = "/run/prefstream-verifier/sandbox.sock"
MAX_REQUEST_BYTES = 16 << 20  # one candidate and its tests, sent to the sidecar
SIDECAR_RUNS = 8  # sandboxes the sidecar runs at once


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock, bwrap's setup included
    memory_bytes: int = 512 << 20  # RLIMIT_AS
    cpu_s: int = 6  # RLIMIT_CPU, per process
    processes: int = 32  # RLIMIT_NPROC: processes and threads of the sandbox
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE
    tmpfs_bytes: int = 16 << 20  # size of /tmp
    open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 64 << 10  # stdout and stderr together, read by the worker


@dataclass
class Result:
    status: str  # "exited", "timeout", "output limit", "unavailable", "error"
    returncode: int | None = None
    output: bytes = b""  # at most Limits.output_bytes of stdout and stderr
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "exited" and self.returncode == 0


@dataclass
class _Sandbox:
    interpreter: str
    binds: list[str] = field(default_factory=list)
    # A new /proc for the sandbox's PID namespace. A container runtime that masks parts of its own
    # /proc makes the kernel refuse that mount; then the sandbox has no /proc at all (never the host's).
    proc: bool = True
    socket: str | None = None  # runs go to the sidecar serving this socket


_lock = threading.Lock()
_probed = False
_sandbox: _Sandbox | None = None
_reason = ""


def _interpreters() -> list[str]:
    """The worker's own base interpreter first (run with -I -S: no site-packages, no venv needed),
    then a system one of the same version (a root worker's pyenv under /root is not readable by
    SANDBOX_UID), then any system python3."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    seen: list[str] = []
    for path in (base, f"/usr/bin/{version}", f"/usr/local/bin/{version}", "/usr/bin/python3"):
        real = os.path.realpath(path)
        if os.path.isfile(real) and real not in seen:
            seen.append(real)
    return seen


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/lib", "/lib64", "/bin", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _prefix_binds(interpreter: str) -> list[str]:
    """Read-only binds for an interpreter outside /usr: its install prefix (bin, lib, libpython)."""
    prefix = os.path.dirname(os.path.dirname(interpreter))  # <prefix>/bin/pythonX.Y
    if interpreter.startswith(os.path.realpath(sys.base_prefix) + "/"):
        prefix = os.path.realpath(sys.base_prefix)
    return [] if prefix == "/usr" or prefix.startswith("/usr/") else ["--ro-bind", prefix, prefix]


def command(sandbox: _Sandbox, limits: Limits, code_fd: int) -> list[str]:
    """The argv of one sandboxed run; the candidate is copied from ``code_fd`` into the sandbox's /tmp."""
    argv = []
    if os.geteuid() == 0:
        argv += [SETPRIV, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--"]
    argv += [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
             "--clearenv", *sandbox.binds, *(["--proc", "/proc"] if sandbox.proc else []), "--dev", "/dev",
             "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp", "--file", str(code_fd), CANDIDATE,
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--",
             PRLIMIT, f"--nproc={limits.processes}", f"--as={limits.memory_bytes}", f"--cpu={limits.cpu_s}",
             f"--fsize={limits.file_bytes}", f"--nofile={limits.open_files}", "--core=0", "--",
             sandbox.interpreter, "-I", "-S", CANDIDATE]
    return argv


def _run(sandbox: _Sandbox, source: str, limits: Limits) -> Result:
    if sandbox.socket:
        return _remote_run(sandbox.socket, source, limits)
    start = time.monotonic()
    deadline = start + limits.timeout_s
    code_fd = os.memfd_create("prefstream-candidate", os.MFD_CLOEXEC)
    try:
        data = memoryview(source.encode("utf-8", "surrogateescape"))
        while data:
            data = data[os.write(code_fd, data):]
        os.lseek(code_fd, 0, os.SEEK_SET)
        proc = subprocess.Popen(command(sandbox, limits, code_fd), env={}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(code_fd,),
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        os.close(code_fd)
        return Result("error", output=str(exc).encode(), seconds=time.monotonic() - start)
    os.close(code_fd)
    status, chunks, size = "exited", [], 0
    fd = proc.stdout.fileno()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if size + len(chunk) > limits.output_bytes:
                chunks.append(chunk[: limits.output_bytes - size])
                status = "output limit"
                break
            chunks.append(chunk)
            size += len(chunk)
        if status == "exited":
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = "timeout"  # closed its output but went on running
    finally:
        if proc.returncode is None:
            _kill(proc)
        proc.stdout.close()
    return Result(status, proc.returncode if status == "exited" else None, b"".join(chunks),
                  time.monotonic() - start)


def _kill(proc: subprocess.Popen) -> None:
    # bwrap's process group (start_new_session); the sandboxed processes are in a session of their
    # own (--new-session) and die with bwrap's PID namespace (--die-with-parent).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _probe() -> tuple[_Sandbox | None, str]:
    if os.path.isdir(os.path.dirname(SIDECAR_SOCKET)):
        return _probe_sidecar(SIDECAR_SOCKET)
    return _probe_local()


def _probe_sidecar(path: str, wait_s: float = 60.0) -> tuple[_Sandbox | None, str]:
    end = time.monotonic() + wait_s  # the sidecar may still be starting
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.5)
    sandbox = _Sandbox("", socket=path)
    result = _run(sandbox, "print(6 * 7)\n", Limits(timeout_s=10.0))
    if result.ok and result.output.strip() == b"42":
        return sandbox, ""
    return None, f"the sandbox sidecar at {path} does not answer: {result.status} {result.output[-300:]!r}"


def _probe_local() -> tuple[_Sandbox | None, str]:
    if not os.path.exists(BWRAP):
        return None, f"bwrap not found at {BWRAP}"
    if os.geteuid() == 0 and not os.path.exists(SETPRIV):
        return None, f"running as root and setpriv not found at {SETPRIV} (RLIMIT_NPROC needs a non-root uid)"
    reasons = []
    for interpreter in _interpreters():
        for proc in (True, False):
            sandbox = _Sandbox(interpreter, _system_binds() + _prefix_binds(interpreter), proc)
            result = _run(sandbox, "print(6 * 7)\n", Limits(timeout_s=10.0))
            if result.ok and result.output.strip() == b"42":
                if reasons:
                    log.info("code verifier sandbox: using %s%s after: %s", interpreter,
                             "" if proc else " without /proc", "; ".join(reasons))
                return sandbox, ""
            reasons.append(f"{interpreter}{'' if proc else ' without /proc'}: {result.status} {result.returncode} "
                           f"{result.output[-300:]!r}")
    return None, "no interpreter runs in bwrap: " + "; ".join(reasons or ["no python interpreter found"])


def available() -> bool:
    """Whether untrusted code can run here; probes once (a trivial run) and logs the answer once."""
    global _probed, _sandbox, _reason
    with _lock:
        if not _probed:
            _sandbox, _reason = _probe()
            _probed = True
            from streams.runtime import metrics

            metrics.CODE_SANDBOX.set(1 if _sandbox else 0)
            if _sandbox:
                log.info("code verifier sandbox: %s", f"the sidecar at {_sandbox.socket}" if _sandbox.socket else
                         f"{BWRAP} as uid {SANDBOX_UID if os.geteuid() == 0 else os.geteuid()}, "
                         f"{_sandbox.interpreter}{'' if _sandbox.proc else ', no /proc'}")
            else:
                log.warning("code verifier disabled, code pairs take the model route: %s", _reason)
        return _sandbox is not None


def unavailable_reason() -> str:
    return _reason


def reset() -> None:
    """Forget the probe (tests, or after installing bwrap)."""
    global _probed, _sandbox, _reason
    with _lock:
        _probed, _sandbox, _reason = False, None, ""


def run_python(source: str, limits: Limits | None = None) -> Result:
    """Run ``source`` as a script in a fresh sandbox; never runs it without one."""
    if not available():
        return Result("unavailable")
    return _run(_sandbox, source, limits or Limits())


# The sidecar: one JSON line in ({"source", "limits"}), one JSON line out (the Result, output as latin-1).

_LIMIT_FIELDS = {f.name for f in fields(Limits)}
_MAX_LIMITS = Limits(timeout_s=60.0, memory_bytes=2 << 30, cpu_s=60, processes=64, file_bytes=16 << 20,
                     tmpfs_bytes=64 << 20, open_files=1024, output_bytes=1 << 20)


def _remote_run(path: str, source: str, limits: Limits) -> Result:
    start = time.monotonic()
    request = json.dumps({"source": source, "limits": asdict(limits)}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(limits.timeout_s + 10.0)
            conn.connect(path)
            conn.sendall(request)
            with conn.makefile("rb") as reply_file:
                # JSON escapes a byte in at most 6 characters; anything longer is no reply of the sidecar.
                line = reply_file.readline(6 * limits.output_bytes + 4096)
        reply = json.loads(line)
        return Result(str(reply["status"]), reply["returncode"], reply["output"].encode("latin-1"),
                      time.monotonic() - start)
    except (OSError, ValueError, KeyError, TypeError, UnicodeError) as exc:
        return Result("error", output=f"sandbox sidecar: {exc}".encode(), seconds=time.monotonic() - start)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
        try:
            if len(line) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            request = json.loads(line)
            asked = {k: v for k, v in dict(request.get("limits") or {}).items() if k in _LIMIT_FIELDS}
            limits = Limits(**{k: type(getattr(_MAX_LIMITS, k))(min(v, getattr(_MAX_LIMITS, k)))
                               for k, v in {**asdict(Limits()), **asked}.items()})
            with self.server.slots:  # type: ignore[attr-defined]
                result = _run(self.server.sandbox, str(request["source"]), limits)  # type: ignore[attr-defined]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            result = Result("error", output=f"bad request: {exc}".encode())
        reply = {"status": result.status, "returncode": result.returncode,
                 "output": result.output.decode("latin-1"), "seconds": result.seconds}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def make_server(path: str) -> socketserver.BaseServer:
    """The sidecar's server on ``path`` (a local bwrap sandbox must work here)."""
    sandbox, reason = _probe_local()
    if sandbox is None:
        raise RuntimeError(f"no sandbox works in the sidecar: {reason}")
    if os.path.exists(path):
        os.unlink(path)  # a stale socket of a previous run of this container
    old = os.umask(0o177)  # the socket is the worker's only (same uid): 0600
    try:
        server = _Server(path, _Handler)
    finally:
        os.umask(old)
    server.sandbox = sandbox  # type: ignore[attr-defined]
    server.slots = threading.BoundedSemaphore(SIDECAR_RUNS)  # type: ignore[attr-defined]
    return server


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or argv[0] != "serve":
        print("usage: python -m streams.runtime.processors.sandbox serve [SOCKET]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = argv[1] if len(argv) == 2 else SIDECAR_SOCKET
    server = make_server(path)
    log.info("code verifier sandbox sidecar serving %s (interpreter %s)", path, server.sandbox.interpreter)  # type: ignore[attr-defined]
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
