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
- ``Limits.memory_bytes`` caps the run's total memory, all its processes together: each run gets a
  memory cgroup of that size where the kernel lets this process make one (cgroups.py), else each
  process gets ``memory_bytes / processes`` of address space (at most ``processes`` of them). Which
  one applies is logged and shown in ``prefstream_code_sandbox_memory_mode``;
- a wall-clock timeout and an output bound enforced here: stdout and stderr come through one pipe
  read at most ``Limits.output_bytes``; past it, or past the timeout, the sandbox is killed;
- every process it leaves is reaped: bwrap's outer process exits without waiting for the sandbox's
  own init, which is then re-parented to the nearest reaper. Where that is this process (PID 1 in a
  container, or a child subreaper) :func:`reap_orphans` collects them after each run; the image also
  starts the worker and this module's sidecar under tini.

The code verifier calls :func:`run_tests`: a harness (harness.py) runs the candidate, then the tests,
and only then writes a per-run random token on a pipe of its own. A pass needs exactly that token on
that pipe; an exit status alone, or anything the candidate prints or writes, is no pass.

In Kubernetes the sandbox can run in a sidecar (``k8s/components/code-verifier``): that container
alone may create user namespaces, and runs ``python -m streams.runtime.sandbox serve``
on a Unix socket in a volume shared with the worker. A worker that sees the socket's directory
(``SIDECAR_SOCKET``) sends each run there instead of starting bwrap itself.

If no sandbox works on this machine (no bwrap, user namespaces off, no usable interpreter), the
first call to :func:`available` says so once in the log and in ``prefstream_code_sandbox_available``,
and :func:`run_python` never runs the code.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
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
from pathlib import Path

from streams.runtime.sandbox import cgroups

log = logging.getLogger(__name__)

BWRAP = shutil.which("bwrap") or "/usr/bin/bwrap"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"  # the path inside the sandbox (/usr is bound read-only)
SANDBOX_UID = 65534  # nobody: what a root worker drops to before bwrap
CANDIDATE = "/tmp/candidate.py"
TESTS = "/tmp/tests.py"
HARNESS = "/tmp/harness.py"
HARNESS_SOURCE = Path(__file__).with_name("harness.py")
TOKEN_BYTES = 16  # the per-run token: 32 hex characters
MAX_EVIDENCE_BYTES = 256  # what is read of the token pipe; anything longer is no token
RLIMIT_MODE = "rlimit"
# How long a finished run waits for a re-parented sandbox init to exit before leaving it to the next run.
ORPHAN_WAIT_S = 1.0
SIDECAR_SOCKET = "/run/prefstream-verifier/sandbox.sock"
MAX_REQUEST_BYTES = 16 << 20  # one candidate and its tests, sent to the sidecar
SIDECAR_RUNS = 8  # sandboxes the sidecar runs at once


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock, bwrap's setup included
    # All the run's processes together: a memory cgroup of this size, or, without one, RLIMIT_AS of
    # memory_bytes / processes for each process.
    memory_bytes: int = 512 << 20
    cpu_s: int = 6  # RLIMIT_CPU, per process
    # RLIMIT_NPROC: processes and threads of the sandbox. Without a cgroup it also divides memory_bytes,
    # so a few processes each get a usable share (64 MiB of the default 512).
    processes: int = 8
    file_bytes: int = 1 << 20  # RLIMIT_FSIZE
    tmpfs_bytes: int = 16 << 20  # size of /tmp
    open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 64 << 10  # stdout and stderr together, read by the worker


@dataclass
class Result:
    status: str  # "exited", "timeout", "output limit", "memory limit", "unavailable", "error"
    returncode: int | None = None
    output: bytes = b""  # at most Limits.output_bytes of stdout and stderr
    seconds: float = 0.0
    evidence: bytes = b""  # what came on the token pipe (run_tests), at most MAX_EVIDENCE_BYTES + 1
    passed: bool = False  # run_tests: the harness's token arrived, alone, after every test ran
    memory_mode: str = ""  # how the run's memory was capped ("cgroup_v1", "cgroup_v2", "rlimit")

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
    memory: cgroups.Hierarchy | None = None  # where each run gets its memory cgroup; None: rlimit mode
    memory_mode: str = RLIMIT_MODE  # as reported (by the sidecar, for a socket)

    def address_space(self, limits: Limits) -> int:
        """RLIMIT_AS per process: the whole cap under a cgroup, else the cap shared by the processes."""
        return limits.memory_bytes if self.memory is not None else max(1, limits.memory_bytes // limits.processes)


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


def command(sandbox: _Sandbox, limits: Limits, files: list[tuple[int, str]], script: list[str]) -> list[str]:
    """The argv of one sandboxed run: each (fd, path) of ``files`` is copied into the sandbox's /tmp, then
    the interpreter runs ``script`` (a script path and its arguments)."""
    argv = []
    if os.geteuid() == 0:
        argv += [SETPRIV, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--"]
    copies = [arg for fd, path in files for arg in ("--file", str(fd), path)]
    argv += [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
             "--clearenv", *sandbox.binds, *(["--proc", "/proc"] if sandbox.proc else []), "--dev", "/dev",
             "--size", str(limits.tmpfs_bytes), "--tmpfs", "/tmp", *copies,
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--",
             PRLIMIT, f"--nproc={limits.processes}", f"--as={sandbox.address_space(limits)}", f"--cpu={limits.cpu_s}",
             f"--fsize={limits.file_bytes}", f"--nofile={limits.open_files}", "--core=0", "--",
             sandbox.interpreter, "-I", "-S", *script]
    return argv


def _memfd(name: str, text: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        data = memoryview(text.encode("utf-8", "surrogateescape"))
        while data:
            data = data[os.write(fd, data):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def _run(sandbox: _Sandbox, source: str, limits: Limits, tests: str | None = None,
         token: bytes | None = None) -> Result:
    """Run ``source`` as a script; with ``tests``, run it and them under the harness, which writes ``token``
    to the evidence pipe after the last test (Result.evidence)."""
    if sandbox.socket:
        return _remote_run(sandbox.socket, source, limits, tests, token)
    start = time.monotonic()
    deadline = start + limits.timeout_s
    inherited: list[int] = []  # the sandbox's copies; ours are closed once it started
    evidence_fd: int | None = None
    cgroup: cgroups.RunCgroup | None = None
    try:
        files = []
        texts = [(source, CANDIDATE)] + ([(tests, TESTS), (_harness_source(), HARNESS)] if tests is not None else [])
        for text, path in texts:
            fd = _memfd(f"prefstream-{os.path.basename(path)}", text)
            inherited.append(fd)
            files.append((fd, path))
        script = [CANDIDATE]
        if tests is not None:
            token_fd, token_w = os.pipe()
            inherited.append(token_fd)
            try:
                os.write(token_w, token or b"")  # a few bytes: the pipe's buffer holds them, nobody reads yet
            finally:
                os.close(token_w)
            evidence_fd, evidence_w = os.pipe()
            inherited.append(evidence_w)
            script = [HARNESS, CANDIDATE, TESTS, str(token_fd), str(evidence_w)]
        argv = command(sandbox, limits, files, script)
        if sandbox.memory is not None:
            cgroup = sandbox.memory.create(limits.memory_bytes)
            argv = cgroup.wrap(argv)
        # Registered under the lock that reap_orphans holds: it never reaps a run's own bwrap.
        with _children_lock:
            proc = subprocess.Popen(argv, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, pass_fds=tuple(inherited), start_new_session=True,
                                    close_fds=True)
            _active.add(proc.pid)
    except OSError as exc:
        if evidence_fd is not None:
            os.close(evidence_fd)
        if cgroup is not None:
            cgroup.close()
        return Result("error", output=str(exc).encode(), seconds=time.monotonic() - start,
                      memory_mode=sandbox.memory_mode)
    finally:
        for fd in inherited:
            os.close(fd)
    status, chunks, size, evidence = "exited", [], 0, b""
    assert proc.stdout is not None  # started with stdout=PIPE
    out_fd = proc.stdout.fileno()
    reading = [out_fd] + ([evidence_fd] if evidence_fd is not None else [])
    try:
        while out_fd in reading:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            ready, _, _ = select.select(reading, [], [], left)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if fd == evidence_fd:
                    evidence += chunk
                    if not chunk or len(evidence) > MAX_EVIDENCE_BYTES:
                        reading.remove(fd)  # past the bound it can no longer be the token alone
                    continue
                if not chunk:
                    reading.remove(fd)
                elif size + len(chunk) > limits.output_bytes:
                    chunks.append(chunk[: limits.output_bytes - size])
                    status = "output limit"
                    reading.clear()
                    break
                else:
                    chunks.append(chunk)
                    size += len(chunk)
        if status == "exited":
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = "timeout"  # closed its output but went on running
        if status == "exited" and evidence_fd is not None and evidence_fd in reading:
            evidence += _drain(evidence_fd, MAX_EVIDENCE_BYTES + 1 - len(evidence))
    finally:
        if proc.returncode is None:
            _kill(proc)
        proc.stdout.close()
        if evidence_fd is not None:
            os.close(evidence_fd)
        with _children_lock:
            _active.discard(proc.pid)
        oom, _peak = cgroup.close() if cgroup is not None else (False, None)
        reap_orphans()
    if oom and status == "exited":
        status = "memory limit"  # the kernel killed one of the run's processes at the run's cap
    return Result(status, proc.returncode if status == "exited" else None, b"".join(chunks),
                  time.monotonic() - start, evidence=evidence[: MAX_EVIDENCE_BYTES + 1], memory_mode=sandbox.memory_mode)


def _drain(fd: int, limit: int) -> bytes:
    """What is left on a pipe whose writers have all exited (bwrap has, with its PID namespace)."""
    data = b""
    while len(data) < limit:
        ready, _, _ = select.select([fd], [], [], 0)
        if not ready:
            break
        chunk = os.read(fd, limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _harness_source() -> str:
    return HARNESS_SOURCE.read_text(encoding="utf-8")


def _kill(proc: subprocess.Popen) -> None:
    # bwrap's process group (start_new_session); the sandboxed processes are in a session of their
    # own (--new-session) and die with bwrap's PID namespace (--die-with-parent).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# Reaping. bwrap's outer process leaves as soon as the sandboxed command has exited, without waiting
# for the sandbox's init (the inner bwrap, PID 1 of its namespace); that init is then re-parented to the
# nearest reaper and, where that is this process, stays a zombie unless reaped here.
_children_lock = threading.Lock()
_active: set[int] = set()  # runs' own bwrap processes, waited for by their Popen


def _child_pids() -> set[int]:
    me = os.getpid()
    if os.path.exists(f"/proc/{me}/task/{me}/children"):
        found: set[int] = set()
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{me}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{me}/task/{tid}/children") as fh:
                    found.update(int(p) for p in fh.read().split())
        return found
    found = set()  # a kernel without /proc/<pid>/task/<tid>/children: every process's parent
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{name}/stat", "rb") as fh:
                if int(fh.read().rsplit(b")", 1)[1].split()[1]) == me:
                    found.add(int(name))
    return found


def _is_bwrap(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm", "rb") as fh:
            return fh.read().strip() == b"bwrap"
    except OSError:
        return False


def reap_orphans(wait_s: float = ORPHAN_WAIT_S) -> int:
    """Reap the sandbox inits re-parented to this process (it is PID 1 or a subreaper); how many.

    Only bwrap processes no run of this module is waiting for are touched, so no other child's exit
    status is taken from its owner. One still running (its sandbox is being torn down) is waited for
    up to ``wait_s``; after that the next run reaps it.
    """
    end = time.monotonic() + wait_s
    reaped = 0
    while True:
        running = 0
        with _children_lock:
            for pid in _child_pids() - _active:
                if not _is_bwrap(pid):
                    continue
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                if done:
                    reaped += 1
                else:
                    running += 1
        if not running or time.monotonic() > end:
            return reaped
        time.sleep(0.01)


def _probe() -> tuple[_Sandbox | None, str]:
    if os.path.isdir(os.path.dirname(SIDECAR_SOCKET)):
        return _probe_sidecar(SIDECAR_SOCKET)
    return _probe_local()


def _probe_run(sandbox: _Sandbox) -> tuple[bool, Result]:
    """A trivial candidate and test through the harness: the whole path a verdict takes."""
    token = _token()
    result = _run(sandbox, "print(6 * 7)\n", Limits(timeout_s=10.0), tests="assert True\n", token=token)
    return _judge(result, token).passed and result.output.strip() == b"42", result


def _probe_sidecar(path: str, wait_s: float = 60.0) -> tuple[_Sandbox | None, str]:
    end = time.monotonic() + wait_s  # the sidecar may still be starting
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.5)
    sandbox = _Sandbox("", socket=path)
    works, result = _probe_run(sandbox)
    if works:
        sandbox.memory_mode = result.memory_mode or RLIMIT_MODE
        return sandbox, ""
    return None, f"the sandbox sidecar at {path} does not answer: {result.status} {result.output[-300:]!r}"


def _probe_local() -> tuple[_Sandbox | None, str]:
    if not os.path.exists(BWRAP):
        return None, f"bwrap not found at {BWRAP}"
    if os.geteuid() == 0 and not os.path.exists(SETPRIV):
        return None, f"running as root and setpriv not found at {SETPRIV} (RLIMIT_NPROC needs a non-root uid)"
    reasons: list[str] = []
    hierarchy = cgroups.find()
    for memory in ([hierarchy, None] if hierarchy is not None else [None]):
        for interpreter in _interpreters():
            for proc in (True, False):
                sandbox = _Sandbox(interpreter, _system_binds() + _prefix_binds(interpreter), proc, memory=memory,
                                   memory_mode=memory.mode if memory is not None else RLIMIT_MODE)
                works, result = _probe_run(sandbox)
                if works:
                    if reasons:
                        log.info("code verifier sandbox: using %s%s (%s) after: %s", interpreter,
                                 "" if proc else " without /proc", sandbox.memory_mode, "; ".join(reasons))
                    return sandbox, ""
                reasons.append(f"{interpreter}{'' if proc else ' without /proc'} ({sandbox.memory_mode}): "
                               f"{result.status} {result.returncode} {result.output[-300:]!r}")
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
            for mode in (RLIMIT_MODE, "cgroup_v1", "cgroup_v2"):
                metrics.CODE_SANDBOX_MEMORY.labels(mode).set(1 if _sandbox and _sandbox.memory_mode == mode else 0)
            if _sandbox:
                log.info("code verifier sandbox: %s; a run's memory is capped by %s", f"the sidecar at {_sandbox.socket}"
                         if _sandbox.socket else f"{BWRAP} as uid {SANDBOX_UID if os.geteuid() == 0 else os.geteuid()}, "
                         f"{_sandbox.interpreter}{'' if _sandbox.proc else ', no /proc'}",
                         "a memory cgroup per run" if _sandbox.memory_mode != RLIMIT_MODE else
                         "an address-space limit of the cap / the process limit on each process (no cgroup "
                         "can be created here)")
            else:
                log.warning("code verifier disabled, code pairs take the model route: %s", _reason)
        return _sandbox is not None


def memory_mode() -> str:
    """How a run's total memory is capped here ("cgroup_v1", "cgroup_v2", "rlimit"); "" without a sandbox."""
    return _sandbox.memory_mode if available() and _sandbox else ""


def unavailable_reason() -> str:
    return _reason


def reset() -> None:
    """Forget the probe (tests, or after installing bwrap)."""
    global _probed, _sandbox, _reason
    with _lock:
        _probed, _sandbox, _reason = False, None, ""


def run_python(source: str, limits: Limits | None = None) -> Result:
    """Run ``source`` as a script in a fresh sandbox; never runs it without one."""
    if not available() or _sandbox is None:
        return Result("unavailable")
    return _run(_sandbox, source, limits or Limits())


def _token() -> bytes:
    return secrets.token_hex(TOKEN_BYTES).encode()


def _judge(result: Result, token: bytes) -> Result:
    result.passed = (result.status == "exited" and result.returncode == 0
                     and hmac.compare_digest(result.evidence, token))
    return result


def run_tests(code: str, tests: str, limits: Limits | None = None) -> Result:
    """Run ``code`` then ``tests`` under the harness in a fresh sandbox; ``Result.passed`` is True only when
    the harness's random token for this run arrived, alone, on its pipe (it is written after the last test).
    Never runs anything without a sandbox."""
    if not available() or _sandbox is None:
        return Result("unavailable")
    token = _token()
    return _judge(_run(_sandbox, code, limits or Limits(), tests=tests, token=token), token)


# The sidecar: one JSON line in ({"source", "limits"}, and "tests" and "token" for run_tests), one JSON
# line out (the Result; output and evidence as latin-1). The worker, not the sidecar, compares the token.

_LIMIT_FIELDS = {f.name for f in fields(Limits)}
_MAX_LIMITS = Limits(timeout_s=60.0, memory_bytes=2 << 30, cpu_s=60, processes=64, file_bytes=16 << 20,
                     tmpfs_bytes=64 << 20, open_files=1024, output_bytes=1 << 20)


def _remote_run(path: str, source: str, limits: Limits, tests: str | None = None,
                token: bytes | None = None) -> Result:
    start = time.monotonic()
    ask = {"source": source, "limits": asdict(limits)}
    if tests is not None:
        ask |= {"tests": tests, "token": (token or b"").decode("ascii")}
    request = json.dumps(ask).encode() + b"\n"
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
                      time.monotonic() - start, evidence=str(reply.get("evidence", "")).encode("latin-1"),
                      memory_mode=str(reply.get("memory_mode", "")))
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
            tests, token = request.get("tests"), request.get("token")
            if tests is not None and not (isinstance(tests, str) and isinstance(token, str)
                                          and 0 < len(token) <= MAX_EVIDENCE_BYTES):
                raise ValueError("tests must come as a string with a token of 1 to 256 characters")
            with self.server.slots:  # type: ignore[attr-defined]
                result = _run(self.server.sandbox, str(request["source"]), limits,  # type: ignore[attr-defined]
                              tests, token.encode("ascii") if tests is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # UnicodeError is a ValueError
            result = Result("error", output=f"bad request: {exc}".encode())
        reply = {"status": result.status, "returncode": result.returncode,
                 "output": result.output.decode("latin-1"), "seconds": result.seconds,
                 "evidence": result.evidence.decode("latin-1"),
                 "memory_mode": self.server.sandbox.memory_mode}  # type: ignore[attr-defined]
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
        print("usage: python -m streams.runtime.sandbox serve [SOCKET]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = argv[1] if len(argv) == 2 else SIDECAR_SOCKET
    server = make_server(path)
    log.info("code verifier sandbox sidecar serving %s (interpreter %s, memory capped by %s)", path,
             server.sandbox.interpreter, server.sandbox.memory_mode)  # type: ignore[attr-defined]
    server.serve_forever()
    return 0
