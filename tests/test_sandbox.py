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

from streams.runtime import metrics, sandbox
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


# Candidates that try to pass without their tests passing, each with a correct or wrong ``add``.
FAKE_TOKEN = "0123456789abcdef" * 2
CHEATS = {
    "os._exit(0) before the tests": "import os\ndef add(a, b):\n    return a - b\nos._exit(0)",
    "sys.exit(0) before the tests": "import sys\ndef add(a, b):\n    return a - b\nsys.exit(0)",
    "SystemExit(0) from inside a test": "def add(a, b):\n    raise SystemExit(0)",
    "a printed pass line": f"import os\nprint('PASSED', {FAKE_TOKEN!r}, flush=True)\nos._exit(0)",
    # Every descriptor it can find, and the files a harness might use, get a made-up token; the code itself
    # is right, so only the early write can make it fail.
    "an early write to every descriptor and token file": f"""
import os
for name in os.listdir('/proc/self/fd'):
    try:
        os.write(int(name), {FAKE_TOKEN!r}.encode())
    except OSError:
        pass
for path in ('/tmp/token', '/tmp/evidence', '/tmp/result', '/tmp/passed'):
    open(path, 'w').write({FAKE_TOKEN!r})
def add(a, b):
    return a + b
""",
    # It looks for the token on every descriptor before any test ran: the harness closed it already.
    "reading the token early": """
import os
found = b''
for name in os.listdir('/proc/self/fd'):
    try:
        found += os.read(int(name), 64)
    except OSError:
        pass
for name in os.listdir('/proc/self/fd'):
    try:
        os.write(int(name), found)
    except OSError:
        pass
os._exit(0)
""",
}
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@needs_bwrap
@pytest.mark.timeout(60)
@pytest.mark.parametrize("cheat", list(CHEATS))
def test_a_candidate_that_leaves_early_or_fakes_the_evidence_fails(sb, cheat):
    result = sandbox.run_tests(CHEATS[cheat], ADD_TESTS)
    assert not result.passed, result
    assert not run_python(CHEATS[cheat], ADD_TESTS)
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    pair = {"conversation": [{"role": "user", "content": "add"}], "chosen": f"```python\n{CHEATS[cheat]}\n```",
            "rejected": good, "metadata": {"tests": ADD_TESTS}}
    assert verify(pair) == ("code", "rejected")  # the honest response wins, the cheat never does


@needs_bwrap
@pytest.mark.timeout(60)
def test_a_pass_needs_every_test_to_have_run(sb):
    good = "def add(a, b):\n    return a + b"
    result = sandbox.run_tests(good, ADD_TESTS)
    assert result.passed and result.ok and len(result.evidence) == 2 * sandbox.TOKEN_BYTES, result
    # The exit status of a cheat is 0 all the same: the evidence is what differs.
    cheat = sandbox.run_tests(CHEATS["os._exit(0) before the tests"], ADD_TESTS)
    assert cheat.ok and not cheat.passed and cheat.evidence == b""
    # Tests written as functions run even when nothing calls them; one failing is no pass.
    assert sandbox.run_tests(good, "def test_add():\n    assert add(2, 3) == 5\n").passed
    assert not sandbox.run_tests(good, "def test_add():\n    assert add(2, 3) == 6\n").passed
    # Each run has its own token: a token seen in one run is worth nothing in the next.
    assert result.evidence != sandbox.run_tests(good, ADD_TESTS).evidence
    assert not sandbox.run_tests("def add(a, b):\n    return a + b +", ADD_TESTS).passed  # a syntax error


# Runs the sandbox N times from a process that is a child subreaper, as the worker and the sidecar are
# reapers when they are PID 1 of their containers: every orphaned sandbox process comes back to it.
REAPER_SCRIPT = r"""
import ctypes, json, os, subprocess, sys, time
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
from streams.runtime import sandbox

def children():
    out = []
    for pid in sandbox._child_pids():
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        out.append((pid, fields["Name"].strip(), fields["State"].strip()))
    return out

assert sandbox.available(), sandbox.unavailable_reason()
# Without the reaping: bwrap run directly leaves its sandbox init behind as a zombie.
bare = subprocess.run([sandbox.BWRAP, "--unshare-all", "--unshare-user", *sandbox._system_binds(), "--",
                       "/usr/bin/true"], env={}, check=False)
time.sleep(0.5)
before = children()
for i in range(int(sys.argv[1])):
    sandbox.run_python("print(1)")
    sandbox.run_python("while True:\n    pass", sandbox.Limits(timeout_s=0.5))
    sandbox.run_tests("import os\nif os.fork() == 0:\n    import time; time.sleep(30)\nx = 1", "assert x == 1")
print(json.dumps({"bare_rc": bare.returncode, "before": before, "after": children()}))
"""


@needs_bwrap
@pytest.mark.timeout(120)
def test_no_zombie_is_left_where_the_worker_is_the_reaper(sb):
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", REAPER_SCRIPT, "5"], cwd=ROOT, capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["bare_rc"] == 0, report
    # The control: a plain bwrap run left its sandbox init behind as a zombie of the reaper.
    assert [state[0] for _, name, state in report["before"] if name == "bwrap"] == ["Z"], report
    assert report["after"] == [], report  # 15 sandbox runs later: no zombie and no orphan, the bare one reaped too


def _pss_of(marker: str) -> int:
    """Anonymous bytes the processes carrying ``marker`` hold together (proportional set size: a page
    shared after fork counts once)."""
    total = 0
    for pid in _processes_with(marker):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                rollup = dict(line.split(":", 1) for line in fh if ":" in line)
            # Anonymous memory is what a run's allocations take; the interpreter's file pages are shared.
            total += int(rollup.get("Pss_Anon", rollup["Pss"]).split()[0]) << 10
        except (OSError, KeyError, ValueError):
            pass
    return total


ALLOCATORS = """
import time
for i in range(7):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        held = []
        try:
            for _ in range(25):
                held.append(bytearray(8 << 20))  # 8 MiB, every page written
                print('holds', len(held) * 8, flush=True)
        except MemoryError:
            print('refused', flush=True)
        time.sleep(2)
        os._exit(0)
failed = 0
while True:
    try:
        _, status = os.wait()
    except ChildProcessError:
        break
    failed += status != 0
print('children killed', failed)
"""


@needs_bwrap
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["as found here", "rlimit"])
def test_a_fork_bomb_of_allocators_stays_within_the_runs_memory_cap(mode, monkeypatch):
    from streams.runtime.sandbox import cgroups

    if mode == "rlimit":
        monkeypatch.setattr(cgroups, "find", lambda: None)
    sandbox.reset()
    try:
        assert sandbox.available(), sandbox.unavailable_reason()
        found = sandbox.memory_mode()
        if mode == "rlimit":
            assert found == "rlimit"
        cap = 256 << 20  # 7 children asking 200 MiB each: 1.4 GiB without a cap on the total
        marker = f"prefstream-alloc-{uuid.uuid4().hex}"
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _pss_of(marker))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = _run(_marked(marker, ALLOCATORS), memory_bytes=cap, timeout_s=30)
        finally:
            done.set()
            sampler.join()
        out = result.output.decode()
        assert result.memory_mode == found
        assert out.count("holds") > 7, out[-2000:]  # the children did allocate
        # The sampler reads the processes one after another, not at one instant: a child can be counted just
        # before the kernel frees it and a sibling counted after it grew into that memory by a step or two (8 MiB
        # each). One run measured 258 MiB that way under the 256 MiB cgroup cap; without a cap they hold 1.4 GiB.
        slack = 2 * (8 << 20)
        assert peak[0] <= cap + slack, f"{peak[0] >> 20} MiB held together under a {cap >> 20} MiB cap ({found})"
        if found.startswith("cgroup"):
            assert result.status == "memory limit" and not result.ok  # the kernel killed allocators at the cap
        else:
            assert "refused" in out and "holds 200" not in out  # each process got its share only
        assert _gone(marker)
    finally:
        sandbox.reset()


@needs_bwrap
def test_the_memory_mode_is_on_the_metrics(sb):
    from prometheus_client import generate_latest

    text = generate_latest().decode()
    mode = sandbox.memory_mode()
    assert mode in ("cgroup_v1", "cgroup_v2", "rlimit")
    for each in ("cgroup_v1", "cgroup_v2", "rlimit"):
        assert f'prefstream_code_sandbox_memory_mode{{mode="{each}"}} {1.0 if each == mode else 0.0}' in text


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
        assert sandbox.memory_mode() == server.sandbox.memory_mode  # the sidecar's, shown on the worker's /metrics
        assert run_python("def add(a, b):\n    return a + b", "assert add(2, 3) == 5")
        assert not run_python("def add(a, b):\n    return a - b", "assert add(2, 3) == 5")
        # The worker judges the sidecar's evidence against its own token.
        for cheat in ("os._exit(0) before the tests", "sys.exit(0) before the tests", "a printed pass line"):
            assert not run_python(CHEATS[cheat], ADD_TESTS)
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
    # Under tini, which reaps what is re-parented to PID 1 (each run's sandbox init).
    assert sidecar["command"][:5] == ["/usr/bin/tini", "--", "python", "-m", sandbox.__name__]
    assert {m["mountPath"] for m in sidecar["volumeMounts"]} == {socket_dir}
    assert socket_dir in {m["mountPath"] for m in worker["volumeMounts"]}
    # Only the sidecar may create user namespaces (its own Localhost seccomp and AppArmor profiles, shipped with
    # the component, so the namespace keeps enforcing `restricted`), and it sees none of the worker's
    # configuration or secrets.
    assert sidecar["securityContext"]["seccompProfile"] == {"type": "Localhost",
                                                           "localhostProfile": "profiles/prefstream-sandbox.json"}
    assert sidecar["securityContext"]["appArmorProfile"] == {"type": "Localhost", "localhostProfile": "prefstream-sandbox"}
    unconfined = {"type": "Unconfined"}
    assert worker["securityContext"].get("seccompProfile") != unconfined
    assert pod.get("securityContext", {}).get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault"
    assert "env" not in sidecar and "envFrom" not in sidecar
    csc = sidecar["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"] == {"drop": ["ALL"]} and sidecar["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
