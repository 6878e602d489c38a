"""The code verifier's test harness. It runs inside the sandbox (``python -I -S harness.py ...``) and is
never imported by the worker: sandbox.py copies this file's source into each run.

    harness.py CANDIDATE TESTS TOKEN_FD EVIDENCE_FD

It reads the run's random token from TOKEN_FD (a pipe the worker filled and closed) and closes that
descriptor before any candidate code runs. Then it runs the candidate and the tests in one namespace
(as one script would), then calls the no-argument ``test*`` functions the tests define, so tests
written as functions run even when nothing calls them. Only when all of that returned does it write
the token to EVIDENCE_FD and leave with ``os._exit(0)`` (no candidate ``atexit`` hook runs after it).
The worker counts a pass only when EVIDENCE_FD carried exactly the token: an exit status, anything
printed, a file written, or an early write to EVIDENCE_FD (the token then no longer arrives alone)
is no pass. ``SystemExit`` from the candidate or the tests (``sys.exit(0)`` before the tests) is a
failure, and ``os._exit(0)`` leaves before the token is written.
"""

import os
import sys


def _read_all(fd):
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the candidate may have replaced or closed the stream; its output is its own
            pass


def main():
    candidate, tests, token_fd, evidence_fd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    token = _read_all(token_fd)
    os.close(token_fd)
    write, leave = os.write, os._exit  # bound now: the candidate may rebind the os module's names
    del sys.argv[1:]  # the candidate sees the argv of a script run on its own
    sys.argv[0] = candidate
    namespace = {"__name__": "__main__", "__file__": candidate, "__builtins__": __builtins__}
    try:
        for path in (candidate, tests):
            with open(path, "rb") as fh:
                code = compile(fh.read(), path, "exec", dont_inherit=True)
            exec(code, namespace)
        for name, fn in list(namespace.items()):
            test_code = getattr(fn, "__code__", None)
            if (name.startswith("test") and callable(fn) and test_code is not None
                    and test_code.co_filename == tests and test_code.co_argcount == 0):
                fn()
    except BaseException:  # SystemExit and KeyboardInterrupt included: leaving before the end is no pass
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
        _flush()
        leave(1)
    _flush()
    write(evidence_fd, token)
    leave(0)


if __name__ == "__main__":
    main()
