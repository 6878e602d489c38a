"""The code verifier's sandbox: one test per attack a pair's code can try, each failing safely while
this process goes on with bounded memory; the verdict still works; without a sandbox no code runs."""

from __future__ import annotations

import ast
import os
import resource
import shutil
import socket
import subprocess
import textwrap
import threading
import time
import uuid

import pytest
import yaml

from streams.runtime import metrics
from streams.runtime.processors import sandbox
from streams.runtime.processors.verifiers import run_python, verify, verify_code
from tests.helpers import ROOT, needs_bwrap


@pytest.fixture
def sb():
    if not sandbox.available():
        pytest.fail(f"bwrap is installed but no sandbox works here: {sandbox.unavailable_reason()}")
    return sandbox


def _run(source: str, **limits) -> sandbox.Result:
    return sandbox.run_python(textwrap.dedent(source), sandbox.Limits(**limits))


def _processes_with(marker: str) -> list[str]:
    """Host PIDs whose command line holds ``marker`` (the sandbox's own PIDs mean nothing out here)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read():
                        found.append(pid)
            except OSError:
                pass
    return found


def _gone(marker: str, within_s: float = 3.0) -> bool:
    end = time.monotonic() + within_s
    while _processes_with(marker):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


# A prologue that re-runs the candidate with a unique marker in its argv, so that it and everything it
# forks can be found in the host's /proc.
def _marked(marker: str, body: str) -> str:
    return (f"import os, sys\nif {marker!r} not in sys.argv:\n"
            f"    os.execv(sys.executable, [sys.executable, '-I', '-S', sys.argv[0], {marker!r}])\n"
            + textwrap.dedent(body))


@needs_bwrap
@pytest.mark.timeout(60)
def test_environment_of_the_worker_is_invisible(sb, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("PREFSTREAM_TEST_SECRET", secret)
    result = _run("""
        import os
        print(dict(os.environ))
        for pid in sorted(p for p in os.listdir('/proc') if p.isdigit()) + ['self', str(os.getppid())]:
            print(pid, open(f'/proc/{pid}/environ', 'rb').read())
        for path in ('/work', '/root', '/etc/passwd', '/home'):
            print(path, os.path.exists(path))
    """)
    assert result.ok, result
    out = result.output.decode()
    assert secret not in out and "PREFSTREAM_TEST_SECRET" not in out
    assert "1 b''" in out  # /proc/1 is the sandbox's own init, started with an empty environment
    # The candidate's os.environ: only what bwrap (--chdir) and Python's C locale coercion set.
    assert set(ast.literal_eval(out.splitlines()[0])) <= {"PWD", "LC_CTYPE"}
    assert "/work False" in out and "/etc/passwd False" in out


@needs_bwrap
@pytest.mark.timeout(60)
def test_no_network_even_through_the_raw_socket_module(sb):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = _run(f"""
            import _socket
            s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(('127.0.0.1', {port}))
            print('CONNECTED')
        """)
        assert not result.ok and b"CONNECTED" not in result.output, result
        assert b"ConnectionRefusedError" in result.output  # the sandbox's own loopback: nobody listens
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing reached the host's listener
    finally:
        listener.close()


@needs_bwrap
@pytest.mark.timeout(60)
def test_writes_outside_the_private_tmp_fail(sb, tmp_path):
    name = f"pwned-{uuid.uuid4().hex}"
    targets = [os.path.join(os.getcwd(), name), f"/root/{name}", f"/usr/{name}", f"/{name}", f"/dev/{name}",
               f"/dev/shm/{name}", str(tmp_path / name)]
    result = _run(f"""
        import os
        for path in {targets!r}:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, 'w').write('x')
                print('WROTE', path)
            except OSError as exc:
                print('REFUSED', path, type(exc).__name__)
        open('/tmp/scratch', 'w').write('fine')  # the private tmpfs is writable
        print('TMP', open('/tmp/scratch').read())
    """)
    assert result.ok, result
    out = result.output.decode()
    assert "TMP fine" in out
    for path in targets:
        assert not os.path.exists(path), path
    # Nothing outside /tmp is writable; a path under /tmp (tmp_path, and the checkout itself when it
    # lives there) lands in the sandbox's own tmpfs, never the host's.
    for path in targets:
        assert (f"WROTE {path}" if path.startswith("/tmp/") else f"REFUSED {path}") in out, (path, out)


@needs_bwrap
@pytest.mark.timeout(60)
def test_processes_are_bounded(sb):
    marker = f"prefstream-fork-{uuid.uuid4().hex}"
    result = _run(_marked(marker, """
        import time
        ok = fail = 0
        while fail < 20:
            try:
                pid = os.fork()
            except OSError:
                fail += 1
                continue
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            ok += 1
        print('forked', ok)
    """), processes=16, timeout_s=10)
    assert result.ok, result
    forked = int(result.output.split()[-1])
    assert 0 < forked < 16
    assert _gone(marker)  # the sleeping children went with the sandbox


@needs_bwrap
@pytest.mark.timeout(60)
def test_fork_bomb_is_bounded_and_stopped(sb):
    marker = f"prefstream-bomb-{uuid.uuid4().hex}"
    start = time.monotonic()
    result = _run(_marked(marker, """
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """), timeout_s=2)
    assert result.status == "timeout" and not result.ok
    assert time.monotonic() - start < 10
    assert _gone(marker)


@needs_bwrap
@pytest.mark.timeout(60)
def test_grandchildren_die_with_the_sandbox(sb):
    marker = f"prefstream-grandchild-{uuid.uuid4().hex}"
    # A daemon: double fork, new session, stdout closed (no pipe keeps the worker waiting), then the
    # candidate itself exits 0 straight away.
    result = _run(_marked(marker, """
        import time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                devnull = os.open('/dev/null', os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                time.sleep(60)
            os._exit(0)
        time.sleep(0.3)
        print('parent done')
    """), timeout_s=5)
    assert result.ok, result
    assert _gone(marker)
    # The same while the candidate runs past its time limit.
    marker = f"prefstream-grandchild-{uuid.uuid4().hex}"
    result = _run(_marked(marker, """
        import time
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """), timeout_s=1.5)
    assert result.status == "timeout"
    assert _gone(marker)


@needs_bwrap
@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", [
    "print('x' * 10 ** 8)",
    "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "import sys\nwhile True:\n    sys.stderr.write('y' * 65536)",
])
def test_output_is_cut_at_the_limit(sb, source):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result = _run(source, output_bytes=64 << 10, timeout_s=10)
    assert result.status == "output limit" and not result.ok
    assert len(result.output) == 64 << 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 << 10  # under 50 MiB more, ever


@needs_bwrap
@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", [
    "x = bytearray(2 * 1024 ** 3)",
    "hog = []\nwhile True:\n    hog.append(bytearray(10 ** 7))",
])
def test_memory_hog_fails(sb, source):
    result = _run(source, memory_bytes=256 << 20, timeout_s=10)
    assert result.status == "exited" and result.returncode != 0
    assert b"MemoryError" in result.output


@needs_bwrap
@pytest.mark.timeout(60)
def test_infinite_loop_is_stopped_by_the_time_limit(sb):
    start = time.monotonic()
    result = _run("while True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout" and not result.ok
    assert time.monotonic() - start < 3
    # RLIMIT_CPU stops it on its own before a longer wall clock does.
    result = _run("while True:\n    pass", cpu_s=1, timeout_s=10)
    assert result.status == "exited" and result.returncode != 0 and result.seconds < 5


@needs_bwrap
@pytest.mark.timeout(60)
def test_verdict_still_works(sb):
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    pair = {"conversation": [{"role": "user", "content": "add"}], "chosen": bad, "rejected": good,
            "metadata": {"tests": tests}}
    assert verify(pair) == ("code", "rejected")
    assert verify({**pair, "chosen": good, "rejected": bad}) == ("code", "chosen")
    assert verify({**pair, "rejected": bad}) is None  # both wrong: cannot decide
    assert run_python("def add(a, b):\n    return a + b", tests)
    assert not run_python("def add(a, b):\n    return a - b", tests)
    assert not run_python("while True:\n    pass", "", timeout=1.0)


@pytest.fixture
def no_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    sandbox.reset()
    yield
    sandbox.reset()


def test_without_a_sandbox_the_code_verifier_is_off_and_runs_nothing(no_sandbox, monkeypatch, tmp_path):
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(args)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    marker = tmp_path / "ran"
    code = f"```python\nopen({str(marker)!r}, 'w').write('ran')\ndef add(a, b):\n    return a + b\n```"
    pair = {"conversation": [{"role": "user", "content": "add"}], "chosen": code, "rejected": "def add(a, b): return 0",
            "metadata": {"tests": "assert add(2, 3) == 5"}}
    assert verify_code(pair) is None
    assert verify(pair) is None  # the pair takes the model route
    assert not run_python(code, "")
    assert sandbox.run_python("print(1)").status == "unavailable"
    assert not sandbox.available() and "bwrap not found" in sandbox.unavailable_reason()
    assert metrics.CODE_SANDBOX._value.get() == 0
    assert not started and not marker.exists()


@needs_bwrap
@pytest.mark.timeout(60)
def test_sidecar_serves_sandboxed_runs_over_its_socket(sb, tmp_path, monkeypatch):
    path = str(tmp_path / "sandbox.sock")
    server = sandbox.make_server(path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        remote = sandbox._Sandbox("", socket=path)
        assert sandbox._run(remote, "print(6 * 7)", sandbox.Limits()).output == b"42\n"
        assert sandbox._run(remote, "while True:\n    pass", sandbox.Limits(timeout_s=1)).status == "timeout"
        cut = sandbox._run(remote, "print('\\xff' * 10 ** 7)", sandbox.Limits(output_bytes=1000))
        assert cut.status == "output limit" and cut.output == b"\xc3\xbf" * 500
        # The worker routes its runs there when it sees the socket's directory.
        monkeypatch.setattr(sandbox, "SIDECAR_SOCKET", path)
        sandbox.reset()
        assert sandbox.available() and sandbox._sandbox.socket == path
        assert run_python("def add(a, b):\n    return a + b", "assert add(2, 3) == 5")
        assert not run_python("def add(a, b):\n    return a - b", "assert add(2, 3) == 5")
    finally:
        server.shutdown()
        server.server_close()
        sandbox.reset()
    assert not sandbox._remote_run(path + ".missing", "print(1)", sandbox.Limits()).ok


def test_code_verifier_component_renders_and_validates(tmp_path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; manifests not rendered")
    kv = pytest.importorskip("kubernetes_validate")
    k8s = os.path.relpath(ROOT / "k8s", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{k8s}/base]\ncomponents: [{k8s}/components/code-verifier]\n")
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor=LoadRestrictionsNone", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for d in docs:
        kv.validate(d, "1.30.0", strict=True)
    pod = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefstream-worker")
    pod = pod["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    socket_dir = os.path.dirname(sandbox.SIDECAR_SOCKET)
    assert sidecar["restartPolicy"] == "Always" and sidecar["command"][-1] == sandbox.SIDECAR_SOCKET
    assert sidecar["command"][:3] == ["python", "-m", sandbox.__name__]
    assert {m["mountPath"] for m in sidecar["volumeMounts"]} == {socket_dir}
    assert socket_dir in {m["mountPath"] for m in worker["volumeMounts"]}
    # Only the sidecar may create user namespaces, and it sees none of the worker's configuration or secrets.
    assert sidecar["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    unconfined = {"type": "Unconfined"}
    assert worker["securityContext"].get("seccompProfile") != unconfined
    assert pod.get("securityContext", {}).get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault"
    assert "env" not in sidecar and "envFrom" not in sidecar
    csc = sidecar["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]} and sidecar["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
